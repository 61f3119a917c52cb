//! A shard's replicated state machine over real RocksDB: repository
//! entries, pushes with compare-and-swap, idempotent retries by push id,
//! and packs placed from the transfer staging area before refs commit.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

mod common;
use common::{StateFixture as Fixture, FIXTURE_SHARD as SHARD};

use cairn_packfile::ObjectId;
use cairn_storage_node::shard::state::{keys, LoggedUpdate, PackRef, ShardRequest};

fn oid(n: u8) -> [u8; 20] {
    [n; 20]
}

fn create(slug: &str) -> ShardRequest {
    ShardRequest::CreateRepo {
        workspace: "w".into(),
        slug: slug.into(),
        is_private: true,
        description: String::new(),
        created_at: 1_700_000_000,
    }
}

fn push(
    repo_id: u64,
    push_id: &str,
    pack: Option<PackRef>,
    updates: Vec<LoggedUpdate>,
) -> ShardRequest {
    let n = updates.len();
    ShardRequest::Push {
        repo_id,
        push_id: push_id.into(),
        pack,
        updates,
        atomic: false,
        prior: vec![None; n],
    }
}

fn update(name: &str, old: [u8; 20], new: [u8; 20]) -> LoggedUpdate {
    LoggedUpdate {
        name: name.into(),
        old,
        new,
    }
}

/// A real pack and index made by git, staged where PackTransfer leaves them.
fn stage_real_pack(data_dir: &Path, repo_id: u64) -> (PackRef, [u8; 20]) {
    let work = tempfile::tempdir().expect("tempdir");
    let git = |args: &[&str]| {
        let out = Process::new("git")
            .args(args)
            .current_dir(work.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", work.path())
            .env("GIT_AUTHOR_NAME", "a")
            .env("GIT_AUTHOR_EMAIL", "a@b")
            .env("GIT_COMMITTER_NAME", "a")
            .env("GIT_COMMITTER_EMAIL", "a@b")
            .env("GIT_AUTHOR_DATE", "1700000000 +0000")
            .env("GIT_COMMITTER_DATE", "1700000000 +0000")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    git(&["init", "-q", "-b", "main", "."]);
    std::fs::write(work.path().join("f"), "hello\n").expect("write");
    git(&["add", "f"]);
    git(&["commit", "-q", "-m", "one"]);
    let head = git(&["rev-parse", "HEAD"]).trim().to_owned();
    let out_dir = work.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out");
    let mut child = Process::new("git")
        .args(["pack-objects", "--revs", "-q"])
        .arg(out_dir.join("pack"))
        .current_dir(work.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pack-objects");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{head}\n").as_bytes())
        .expect("feed");
    let out = child.wait_with_output().expect("pack-objects");
    let pack_hex = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let shard_dir = data_dir
        .join("staging/transfer")
        .join(SHARD.0.to_string())
        .join(repo_id.to_string());
    std::fs::create_dir_all(&shard_dir).expect("shard dir");
    for ext in ["pack", "idx"] {
        std::fs::copy(
            out_dir.join(format!("pack-{pack_hex}.{ext}")),
            shard_dir.join(format!("pack-{pack_hex}.{ext}")),
        )
        .expect("stage");
    }
    let mut head_bytes = [0u8; 20];
    head_bytes.copy_from_slice(ObjectId::from_hex(head.as_bytes()).expect("hex").as_bytes());
    (
        PackRef {
            id: pack_hex,
            objects: 3,
            bytes: 0,
        },
        head_bytes,
    )
}

fn committed_pack(data_dir: &Path, repo_id: u64, pack: &PackRef) -> PathBuf {
    data_dir
        .join("packs")
        .join(repo_id.to_string())
        .join(format!("pack-{}.pack", pack.id))
}

#[tokio::test]
async fn repositories_are_created_once_and_deleted_with_their_rows() {
    let mut f = Fixture::new();
    f.apply(&create("a")).await.expect("apply");
    let rec = f.repo("w", "a").expect("created");
    assert_eq!(rec.id >> 40, SHARD.0, "repo ids carry the shard id");
    assert_eq!(rec.head, "refs/heads/main");
    f.apply(&create("a")).await.expect("apply duplicate");
    assert_eq!(f.repo("w", "a").expect("still there").id, rec.id);
    f.apply(&create("b")).await.expect("apply");
    assert_ne!(f.repo("w", "b").expect("b").id, rec.id);
    f.apply(&create("../x")).await.expect("apply invalid");
    assert!(f.repo("w", "../x").is_none());

    f.apply(&push(
        rec.id,
        "p0",
        None,
        vec![update("refs/tags/t", [0; 20], oid(7))],
    ))
    .await
    .expect("push");
    assert_eq!(f.refs(rec.id).len(), 1);
    f.apply(&ShardRequest::DeleteRepo {
        workspace: "w".into(),
        slug: "a".into(),
    })
    .await
    .expect("delete");
    assert!(f.repo("w", "a").is_none());
    assert!(f.refs(rec.id).is_empty(), "refs go with the repository");
}

#[tokio::test]
async fn pushes_compare_and_swap_place_packs_and_are_idempotent_by_id() {
    let mut f = Fixture::new();
    f.apply(&create("r")).await.expect("create");
    let id = f.repo("w", "r").expect("repo").id;
    let (pack, head) = stage_real_pack(f.dir.path(), id);

    let first = push(
        id,
        "push-1",
        Some(pack.clone()),
        vec![update("refs/heads/dev", [0; 20], head)],
    );
    f.apply(&first).await.expect("push");
    assert_eq!(f.push_result("push-1"), vec![Ok(())]);
    assert!(
        committed_pack(f.dir.path(), id, &pack).exists(),
        "pack placed"
    );
    assert!(
        !f.dir
            .path()
            .join(format!(
                "staging/transfer/{}/{id}/pack-{}.pack",
                SHARD.0, pack.id
            ))
            .exists(),
        "staged copy moved, not copied"
    );
    assert_eq!(
        f.repo("w", "r").expect("repo").head,
        "refs/heads/dev",
        "HEAD follows"
    );

    // The same proposal again (a retry after an unknown outcome): same
    // answer, nothing applied twice.
    f.apply(&first).await.expect("retry");
    assert_eq!(f.push_result("push-1"), vec![Ok(())]);

    // A stale compare-and-swap in a later entry is refused and changes nothing.
    f.apply(&push(
        id,
        "push-2",
        None,
        vec![update("refs/heads/dev", oid(9), oid(1))],
    ))
    .await
    .expect("stale push");
    assert!(f.push_result("push-2")[0].is_err());
    let mut head_oid = [0u8; 20];
    head_oid.copy_from_slice(&head);
    assert_eq!(
        f.refs(id),
        vec![(
            "refs/heads/dev".to_owned(),
            ObjectId::from_bytes_or_panic(&head_oid)
        )]
    );

    // Rejections found while validating travel in the entry.
    f.apply(&ShardRequest::Push {
        repo_id: id,
        push_id: "push-3".into(),
        pack: None,
        updates: vec![update("refs/heads/x", [0; 20], oid(5))],
        atomic: false,
        prior: vec![Some("missing necessary objects".into())],
    })
    .await
    .expect("push with prior");
    assert_eq!(
        f.push_result("push-3"),
        vec![Err("missing necessary objects".to_owned())]
    );
}

#[tokio::test]
async fn an_accepted_push_whose_pack_is_absent_stops_apply() {
    let mut f = Fixture::new();
    f.apply(&create("r")).await.expect("create");
    let id = f.repo("w", "r").expect("repo").id;
    let missing = PackRef {
        id: "ab".repeat(20),
        objects: 1,
        bytes: 1,
    };
    let res = f
        .apply(&push(
            id,
            "p",
            Some(missing),
            vec![update("refs/heads/main", [0; 20], oid(1))],
        ))
        .await;
    assert!(res.is_err(), "refs must not commit without their pack");
    assert!(f.refs(id).is_empty());
    assert!(f.view().get(&keys::push("p")).expect("read").is_none());
}

#[tokio::test]
async fn push_results_are_pruned_once_far_behind_the_log() {
    use cairn_storage_node::shard::state::PUSH_RESULT_RETENTION;
    let mut f = Fixture::new();
    f.apply(&create("r")).await.expect("create");
    let id = f.repo("w", "r").expect("repo").id;
    // Refused updates (stale old ids) still record their result.
    let stale = |push_id: &str| {
        push(
            id,
            push_id,
            None,
            vec![update("refs/heads/x", oid(1), oid(2))],
        )
    };
    f.apply(&stale("old-1")).await.expect("push");
    f.apply(&stale("old-2")).await.expect("push");
    let old_index = f.next - 1;
    assert_eq!(f.push_result("old-2").len(), 1);

    // Within the window nothing goes.
    f.next = old_index + PUSH_RESULT_RETENTION - 1;
    f.apply(&stale("mid")).await.expect("push");
    assert!(f.view().get(&keys::push("old-1")).expect("read").is_some());

    // Far enough on, each push drops results older than the window, oldest
    // first, and never a recent one.
    f.next = old_index + PUSH_RESULT_RETENTION + 1;
    f.apply(&stale("new")).await.expect("push");
    for gone in ["old-1", "old-2"] {
        assert!(
            f.view().get(&keys::push(gone)).expect("read").is_none(),
            "{gone} kept"
        );
    }
    assert_eq!(f.push_result("mid").len(), 1);
    assert_eq!(f.push_result("new").len(), 1);
    let ages = f
        .view()
        .scan_prefix(keys::PUSHES_BY_AGE)
        .expect("scan")
        .len();
    assert_eq!(ages, 2, "age index follows the results");
}
