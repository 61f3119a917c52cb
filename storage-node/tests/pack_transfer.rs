//! `PackTransfer` over a real tonic server on 127.0.0.1 with real temp dirs
//! and packs written by the `git` binary: staging, idempotence, refusal of
//! bad data without leftovers, fetching staged and committed packs.

mod common;
use common::git;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_packfile::ObjectId;
use cairn_proto::pack::pack_transfer_client::PackTransferClient;
use cairn_proto::pack::pack_transfer_server::PackTransferServer;
use cairn_proto::pack::{PackChunk, PackFile, PackHeader};
use cairn_storage_node::layout;
use cairn_storage_node::packs::transfer::{
    fetch_pack, stage_pack, FetchError, PackTransferService, StageError, StageOutcome, StagingArea,
    TransferLimits,
};
use tonic::transport::Channel;
use tonic::Code;

const SHARD: u64 = 3;
const REPO: u64 = 11;

/// A pack and its index as written by `git pack-objects`.
struct GitPack {
    _dir: tempfile::TempDir,
    id: ObjectId,
    pack: PathBuf,
    index: PathBuf,
}

impl GitPack {
    fn pack_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.pack).expect("read pack")
    }
    fn index_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.index).expect("read index")
    }
}

/// Incompressible bytes, so a blob of `len` makes a pack of about `len`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A repository with one commit holding a `blob_len`-byte file derived from
/// `seed`, packed whole with `git pack-objects`.
fn git_pack(seed: u64, blob_len: usize) -> GitPack {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("data.bin"), noise(seed, blob_len)).expect("write");
    std::fs::write(repo.join("README"), format!("pack {seed}\n")).expect("write");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "fixture"]);
    let objects = git(&repo, &["rev-list", "--objects", "--all"]);
    let mut child = Command::new("git")
        .args(["pack-objects", "-q", "../pack"])
        .current_dir(&repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pack-objects");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(objects.as_bytes())
            .expect("feed pack-objects");
    }
    let out = child.wait_with_output().expect("pack-objects");
    assert!(out.status.success());
    let hex = String::from_utf8(out.stdout).expect("utf-8");
    let hex = hex.trim();
    let id = ObjectId::from_hex(hex.as_bytes()).expect("pack id");
    GitPack {
        pack: dir.path().join(format!("pack-{hex}.pack")),
        index: dir.path().join(format!("pack-{hex}.idx")),
        _dir: dir,
        id,
    }
}

/// A `PackTransfer` server alone on 127.0.0.1, over `data_dir`.
async fn serve(data_dir: &Path) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = PackTransferService::new(data_dir, TransferLimits::default()).expect("service");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PackTransferServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn connect(addr: SocketAddr) -> PackTransferClient<Channel> {
    PackTransferClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// Every path under `dir`, recursively, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.expect("entry").path();
            out.push(p.strip_prefix(base).expect("prefix").display().to_string());
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn transfer_root(data_dir: &Path) -> PathBuf {
    StagingArea::at(data_dir).root().to_owned()
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The chunk stream a correct sender produces, built in memory so tests can
/// tamper with it.
fn chunks(header: PackHeader, pack: &[u8], index: &[u8], size: usize) -> Vec<PackChunk> {
    let mut out = vec![PackChunk {
        header: Some(header),
        ..Default::default()
    }];
    for (file, bytes) in [(PackFile::Pack, pack), (PackFile::Index, index)] {
        for (i, data) in bytes.chunks(size).enumerate() {
            out.push(PackChunk {
                header: None,
                file: file as i32,
                offset: (i * size) as u64,
                crc32: crc32fast::hash(data),
                data: Bytes::copy_from_slice(data),
            });
        }
    }
    out
}

fn header_of(p: &GitPack, pack_id: &str) -> PackHeader {
    PackHeader {
        shard_id: SHARD,
        repo_id: REPO,
        pack_id: pack_id.to_owned(),
        pack_size: p.pack_bytes().len() as u64,
        index_size: p.index_bytes().len() as u64,
    }
}

async fn stage_raw(
    client: &mut PackTransferClient<Channel>,
    msgs: Vec<PackChunk>,
) -> tonic::Status {
    client
        .stage(tokio_stream::iter(msgs))
        .await
        .expect_err("transfer must be refused")
}

#[tokio::test]
async fn stage_then_fetch_round_trips_byte_identical() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    // Larger than two chunks, so offsets and the trailer split are exercised.
    let p = git_pack(1, 2_500_000);
    assert!(p.pack_bytes().len() > 2 << 20);

    let outcome = stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, p.id)
        .await
        .expect("stage");
    assert_eq!(outcome, StageOutcome::Staged);
    let (staged_pack, staged_index) = StagingArea::at(data.path()).staged_paths(SHARD, REPO, &p.id);
    assert_eq!(std::fs::read(&staged_pack).expect("staged"), p.pack_bytes());
    assert_eq!(
        std::fs::read(&staged_index).expect("staged"),
        p.index_bytes()
    );
    assert_eq!(
        tree(&transfer_root(data.path())),
        vec![
            SHARD.to_string(),
            format!("{SHARD}/{REPO}"),
            format!("{SHARD}/{REPO}/pack-{}.idx", p.id),
            format!("{SHARD}/{REPO}/pack-{}.pack", p.id),
        ],
        "only the staged pair remains"
    );

    let dest = tempfile::tempdir().expect("tempdir");
    let (pack, index) = fetch_pack(&mut client, SHARD, REPO, p.id, dest.path())
        .await
        .expect("fetch");
    assert_eq!(pack, dest.path().join(format!("pack-{}.pack", p.id)));
    assert_eq!(std::fs::read(&pack).expect("fetched"), p.pack_bytes());
    assert_eq!(std::fs::read(&index).expect("fetched"), p.index_bytes());
    assert_eq!(
        tree(dest.path()).len(),
        2,
        "no temp files left: {:?}",
        tree(dest.path())
    );
    // The fetched pair is a usable bundle.
    let bundle = cairn_packfile::store::open_bundle(&index).expect("open fetched");
    assert_eq!(bundle.index.num_objects(), 4);
}

#[tokio::test]
async fn restaging_a_staged_pack_succeeds_without_rewriting() {
    use std::os::unix::fs::MetadataExt;
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(2, 3_000_000);
    assert_eq!(
        stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, p.id)
            .await
            .expect("stage"),
        StageOutcome::Staged
    );
    let (staged, _) = StagingArea::at(data.path()).staged_paths(SHARD, REPO, &p.id);
    let before = std::fs::metadata(&staged).expect("meta");
    let old = std::time::SystemTime::now() - Duration::from_secs(600);
    std::fs::File::open(&staged)
        .and_then(|f| f.set_modified(old))
        .expect("age it");

    for _ in 0..2 {
        assert_eq!(
            stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, p.id)
                .await
                .expect("restage"),
            StageOutcome::AlreadyStaged
        );
    }
    let after = std::fs::metadata(&staged).expect("meta");
    assert_eq!(
        before.ino(),
        after.ino(),
        "the staged file was not replaced"
    );
    assert!(
        after.modified().expect("mtime") > old,
        "re-staging refreshes the TTL clock"
    );
    assert_eq!(std::fs::read(&staged).expect("staged"), p.pack_bytes());
    assert_eq!(tree(&transfer_root(data.path())).len(), 4);
    // The connection is still usable after the early answers.
    fetch_pack(
        &mut client,
        SHARD,
        REPO,
        p.id,
        tempfile::tempdir().expect("tmp").path(),
    )
    .await
    .expect("fetch after restage");
}

#[tokio::test]
async fn bad_crc32_is_invalid_argument_and_leaves_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(3, 300_000);
    let mut msgs = chunks(
        header_of(&p, &p.id.to_string()),
        &p.pack_bytes(),
        &p.index_bytes(),
        64 << 10,
    );
    msgs[2].crc32 ^= 1;
    let status = stage_raw(&mut client, msgs).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("crc32"), "{}", status.message());
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn out_of_order_chunk_is_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(4, 300_000);
    let mut msgs = chunks(
        header_of(&p, &p.id.to_string()),
        &p.pack_bytes(),
        &p.index_bytes(),
        64 << 10,
    );
    msgs.swap(2, 3);
    let status = stage_raw(&mut client, msgs).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("offset"), "{}", status.message());
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn a_stream_ending_early_is_refused_and_leaves_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(5, 300_000);
    let mut msgs = chunks(
        header_of(&p, &p.id.to_string()),
        &p.pack_bytes(),
        &p.index_bytes(),
        64 << 10,
    );
    msgs.truncate(msgs.len() - 1);
    let status = stage_raw(&mut client, msgs).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("stream ended"),
        "{}",
        status.message()
    );
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn a_client_dropping_midway_leaves_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let addr = serve(data.path()).await;
    let mut client = connect(addr).await;
    let p = git_pack(6, 300_000);
    let msgs = chunks(
        header_of(&p, &p.id.to_string()),
        &p.pack_bytes(),
        &p.index_bytes(),
        64 << 10,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in msgs.into_iter().take(3) {
        tx.send(m).await.expect("queue");
    }
    let call = tokio::spawn(async move {
        let _ = client
            .stage(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
    });
    let root = transfer_root(data.path());
    wait_until("the transfer to start", Duration::from_secs(10), || {
        tree(&root).iter().any(|p| p.starts_with("tmp-"))
    })
    .await;
    // The caller goes away with the stream still open: the RPC is cancelled.
    call.abort();
    drop(tx);
    wait_until(
        "the partial transfer to be removed",
        Duration::from_secs(10),
        || tree(&root).is_empty(),
    )
    .await;
    // The server is unaffected.
    let mut client = connect(addr).await;
    stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, p.id)
        .await
        .expect("stage after a dropped transfer");
}

#[tokio::test]
async fn a_pack_id_that_is_not_the_trailer_is_rejected() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(7, 200_000);
    let other = git_pack(8, 200_000);
    let err = stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, other.id)
        .await
        .expect_err("wrong id");
    let StageError::Rejected(status) = err else {
        panic!("expected a rejection, got {err:?}");
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trailer"), "{}", status.message());
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn an_index_of_another_pack_is_rejected() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(9, 200_000);
    let other = git_pack(10, 200_000);
    let err = stage_pack(&mut client, SHARD, REPO, &p.pack, &other.index, p.id)
        .await
        .expect_err("foreign index");
    let StageError::Rejected(status) = err else {
        panic!("expected a rejection, got {err:?}");
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("index"), "{}", status.message());
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn pack_content_not_matching_its_trailer_is_data_loss() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(11, 200_000);
    let mut pack = p.pack_bytes();
    pack[100_000] ^= 0xff; // inside the blob; the trailer still names the id
    let msgs = chunks(
        header_of(&p, &p.id.to_string()),
        &pack,
        &p.index_bytes(),
        64 << 10,
    );
    let status = stage_raw(&mut client, msgs).await;
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(tree(&transfer_root(data.path())), Vec::<String>::new());
}

#[tokio::test]
async fn fetching_an_unknown_pack_is_not_found() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(12, 1000);
    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch_pack(&mut client, SHARD, REPO, p.id, dest.path())
        .await
        .expect_err("unknown pack");
    assert!(matches!(err, FetchError::NotFound), "{err:?}");
    assert_eq!(tree(dest.path()), Vec::<String>::new());
    // Staged under another shard is not this shard's pack either.
    stage_pack(&mut client, SHARD + 1, REPO, &p.pack, &p.index, p.id)
        .await
        .expect("stage");
    let err = fetch_pack(&mut client, SHARD, REPO, p.id, dest.path())
        .await
        .expect_err("other shard");
    assert!(matches!(err, FetchError::NotFound), "{err:?}");
}

#[tokio::test]
async fn fetch_serves_committed_packs_from_a_running_node() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = cairn_storage_node::Config::new(data.path().to_owned());
    config.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    let node = cairn_storage_node::StorageNode::start(config)
        .await
        .expect("start node");
    let mut client = connect(node.grpc_addr).await;
    let p = git_pack(13, 1_500_000);
    let committed = layout::pack_dir(data.path(), REPO);
    std::fs::create_dir_all(&committed).expect("mkdir");
    std::fs::copy(&p.pack, committed.join(format!("pack-{}.pack", p.id))).expect("copy");
    std::fs::copy(&p.index, committed.join(format!("pack-{}.idx", p.id))).expect("copy");

    let dest = tempfile::tempdir().expect("tempdir");
    // Any shard: the committed copy is found by repository.
    let (pack, index) = fetch_pack(&mut client, 99, REPO, p.id, dest.path())
        .await
        .expect("fetch committed");
    assert_eq!(std::fs::read(pack).expect("read"), p.pack_bytes());
    assert_eq!(std::fs::read(index).expect("read"), p.index_bytes());
}

#[tokio::test]
async fn fetch_verifies_what_the_peer_sends() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut client = connect(serve(data.path()).await).await;
    let p = git_pack(14, 200_000);
    let committed = layout::pack_dir(data.path(), REPO);
    std::fs::create_dir_all(&committed).expect("mkdir");
    let mut pack = p.pack_bytes();
    pack[50_000] ^= 0x01; // bit rot on the serving replica
    std::fs::write(committed.join(format!("pack-{}.pack", p.id)), pack).expect("write");
    std::fs::copy(&p.index, committed.join(format!("pack-{}.idx", p.id))).expect("copy");

    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch_pack(&mut client, SHARD, REPO, p.id, dest.path())
        .await
        .expect_err("corrupt copy");
    assert!(matches!(err, FetchError::Corrupt(_)), "{err:?}");
    assert_eq!(tree(dest.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stages_of_different_packs() {
    let data = tempfile::tempdir().expect("tempdir");
    let addr = serve(data.path()).await;
    let packs: Vec<GitPack> = (0..4).map(|i| git_pack(100 + i, 1_200_000)).collect();
    let packs = std::sync::Arc::new(packs);
    let mut tasks = Vec::new();
    for i in 0..packs.len() {
        let packs = packs.clone();
        tasks.push(tokio::spawn(async move {
            let p = &packs[i];
            let mut client = connect(addr).await;
            stage_pack(&mut client, SHARD, REPO, &p.pack, &p.index, p.id).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("stage"), StageOutcome::Staged);
    }
    let area = StagingArea::at(data.path());
    for p in packs.iter() {
        let (pack, index) = area.staged_paths(SHARD, REPO, &p.id);
        assert_eq!(std::fs::read(pack).expect("staged"), p.pack_bytes());
        assert_eq!(std::fs::read(index).expect("staged"), p.index_bytes());
    }
    assert_eq!(tree(area.root()).len(), 2 + 2 * packs.len());
}
