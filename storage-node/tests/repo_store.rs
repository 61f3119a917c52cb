//! RepoStore against real RocksDB in a temp dir: repository records, ref
//! compare-and-swap, atomic pushes, racing pushes, persistence.

use std::sync::{Arc, Barrier};

use cairn_packfile::receive::Command;
use cairn_packfile::ObjectId;
use cairn_storage_node::repo_store::{RepoStore, StoreError};

fn oid(n: u8) -> ObjectId {
    ObjectId::from_bytes_or_panic(&[n; 20])
}

fn null() -> ObjectId {
    ObjectId::null(gix_hash::Kind::Sha1)
}

fn cmd(old: ObjectId, new: ObjectId, name: &str) -> Command {
    Command {
        old,
        new,
        name: name.to_owned(),
    }
}

fn refs_of(store: &RepoStore, ws: &str, slug: &str) -> Vec<(String, ObjectId)> {
    store
        .snapshot(ws, slug)
        .expect("snapshot")
        .refs
        .refs
        .into_iter()
        .map(|r| (r.name, r.target))
        .collect()
}

#[test]
fn create_get_list_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RepoStore::open(dir.path()).expect("open");
    let rec = store
        .create_repo("team", "app", true, "demo")
        .expect("create");
    assert_eq!(rec.head, "refs/heads/main");
    assert!(matches!(
        store.create_repo("team", "app", true, ""),
        Err(StoreError::RepoExists { .. })
    ));
    assert!(matches!(
        store.create_repo("team", "../x", true, ""),
        Err(StoreError::InvalidName { .. })
    ));
    let other = store
        .create_repo("team2", "app", false, "")
        .expect("create");
    assert_ne!(rec.id, other.id);
    let names: Vec<String> = store
        .list_repos("team")
        .expect("list")
        .into_iter()
        .map(|r| r.slug)
        .collect();
    assert_eq!(names, vec!["app".to_owned()]);
    assert_eq!(store.list_repos("").expect("list all").len(), 2);
    store.delete_repo("team", "app").expect("delete");
    assert!(store.get_repo("team", "app").expect("get").is_none());
    assert!(matches!(
        store.snapshot("team", "app"),
        Err(StoreError::RepoNotFound { .. })
    ));
}

#[test]
fn compare_and_swap_and_atomic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RepoStore::open(dir.path()).expect("open");
    let rec = store.create_repo("w", "r", true, "").expect("create");
    let n = |k: usize| vec![None; k];

    let res = store
        .apply_push(
            &rec,
            &[cmd(null(), oid(1), "refs/heads/dev")],
            false,
            &n(1),
            None,
        )
        .expect("apply");
    assert_eq!(res, vec![Ok(())]);
    // HEAD follows the first branch pushed when its target does not exist.
    assert_eq!(
        store.get_repo("w", "r").expect("get").expect("exists").head,
        "refs/heads/dev"
    );

    // Stale old value: rejected, nothing changes.
    let res = store
        .apply_push(
            &rec,
            &[cmd(oid(9), oid(2), "refs/heads/dev")],
            false,
            &n(1),
            None,
        )
        .expect("apply");
    assert!(res[0].is_err());
    assert_eq!(
        refs_of(&store, "w", "r"),
        vec![("refs/heads/dev".to_owned(), oid(1))]
    );

    // Atomic with one stale command: nothing applied.
    let cmds = [
        cmd(oid(1), oid(2), "refs/heads/dev"),
        cmd(null(), oid(3), "refs/heads/feature"),
        cmd(oid(7), oid(4), "refs/heads/missing"),
    ];
    let res = store
        .apply_push(&rec, &cmds, true, &n(3), None)
        .expect("apply");
    assert!(res.iter().all(|r| r.is_err()), "{res:?}");
    assert_eq!(
        refs_of(&store, "w", "r"),
        vec![("refs/heads/dev".to_owned(), oid(1))]
    );

    // Same without atomic: the good ones land.
    let res = store
        .apply_push(&rec, &cmds, false, &n(3), None)
        .expect("apply");
    assert_eq!(res[0], Ok(()));
    assert_eq!(res[1], Ok(()));
    assert!(res[2].is_err());
    assert_eq!(
        refs_of(&store, "w", "r"),
        vec![
            ("refs/heads/dev".to_owned(), oid(2)),
            ("refs/heads/feature".to_owned(), oid(3)),
        ]
    );

    // Delete, and a prior (validation) error rejects its command.
    let res = store
        .apply_push(
            &rec,
            &[
                cmd(oid(3), null(), "refs/heads/feature"),
                cmd(oid(2), oid(5), "refs/heads/dev"),
            ],
            false,
            &[None, Some("missing necessary objects".to_owned())],
            None,
        )
        .expect("apply");
    assert_eq!(res[0], Ok(()));
    assert!(res[1].is_err());
    assert_eq!(
        refs_of(&store, "w", "r"),
        vec![("refs/heads/dev".to_owned(), oid(2))]
    );
}

#[test]
fn racing_pushes_to_one_ref_have_exactly_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RepoStore::open(dir.path()).expect("open"));
    let rec = store.create_repo("w", "race", true, "").expect("create");
    store
        .apply_push(
            &rec,
            &[cmd(null(), oid(1), "refs/heads/main")],
            false,
            &[None],
            None,
        )
        .expect("seed");
    for round in 0..20u8 {
        let base = refs_of(&store, "w", "race")[0].1;
        let threads = 4;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.clone();
                let rec = rec.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let new = oid(100 + round.wrapping_mul(8) + t as u8);
                    barrier.wait();
                    let res = store
                        .apply_push(
                            &rec,
                            &[cmd(base, new, "refs/heads/main")],
                            false,
                            &[None],
                            None,
                        )
                        .expect("apply");
                    (new, res[0].is_ok())
                })
            })
            .collect();
        let outcomes: Vec<(ObjectId, bool)> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let winners: Vec<_> = outcomes.iter().filter(|(_, ok)| *ok).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        assert_eq!(refs_of(&store, "w", "race")[0].1, winners[0].0);
    }
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RepoStore::open(dir.path()).expect("open");
        let rec = store.create_repo("w", "keep", true, "").expect("create");
        store
            .apply_push(
                &rec,
                &[cmd(null(), oid(4), "refs/tags/v1")],
                false,
                &[None],
                None,
            )
            .expect("apply");
        std::fs::write(dir.path().join("staging").join("junk.pack"), b"x").expect("junk");
        let transfer = dir.path().join("staging").join("transfer").join("1");
        std::fs::create_dir_all(&transfer).expect("transfer dir");
        std::fs::write(transfer.join("pack-ab.pack"), b"acknowledged").expect("staged");
    }
    let store = RepoStore::open(dir.path()).expect("reopen");
    assert_eq!(
        refs_of(&store, "w", "keep"),
        vec![("refs/tags/v1".to_owned(), oid(4))]
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
        .expect("staging")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("transfer")],
        "push leftovers are removed on open"
    );
    assert!(
        dir.path().join("staging/transfer/1/pack-ab.pack").exists(),
        "packs transferred from a leader survive a restart"
    );
    let next = store.create_repo("w", "second", true, "").expect("create");
    assert_eq!(next.id, 2, "id allocation persists");
}

/// Rows as an earlier release wrote them: repositories keyed by names of
/// any case.
fn write_legacy_repos(dir: &std::path::Path, names: &[(&str, &str)]) {
    {
        // Creates the database with its column families, then closes it.
        RepoStore::open(dir).expect("open");
    }
    let cfs = ["repos", "refs", "packs", "meta"];
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.join("rocksdb"), cfs)
        .expect("raw open");
    let repos = db.cf_handle("repos").expect("repos cf");
    for (i, (ws, slug)) in names.iter().enumerate() {
        let record = serde_json::json!({
            "id": 100 + i as u64, "workspace": ws, "slug": slug,
            "head": "refs/heads/main", "is_private": true,
            "description": "", "created_at": 0,
        });
        db.put_cf(repos, format!("{ws}/{slug}"), record.to_string())
            .expect("put");
    }
}

#[test]
fn names_compare_without_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RepoStore::open(dir.path()).expect("open");
    let rec = store
        .create_repo("Team", "Case1", true, "")
        .expect("create");
    assert_eq!(
        (rec.workspace.as_str(), rec.slug.as_str()),
        ("team", "case1")
    );
    assert!(matches!(
        store.create_repo("team", "case1", true, ""),
        Err(StoreError::RepoExists { .. })
    ));
    assert!(matches!(
        store.create_repo("TEAM", "CASE1", true, ""),
        Err(StoreError::RepoCaseClash { .. })
    ));
    assert_eq!(
        store.require_repo("TeAm", "cAsE1").expect("found").id,
        rec.id
    );
    assert!(matches!(
        store.create_repo("team", "x", true, &"d".repeat(2049)),
        Err(StoreError::InvalidName(_))
    ));
}

#[test]
fn legacy_names_move_and_clashes_stay_apart_until_settled() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_legacy_repos(
        dir.path(),
        &[
            ("Solo", "Repo"),
            ("ws", "Case1"),
            ("ws", "case1"),
            ("ws", "plain"),
        ],
    );
    let store = RepoStore::open(dir.path()).expect("open");
    // The lone legacy name moved.
    let solo = store.require_repo("solo", "repo").expect("solo");
    assert_eq!(
        (solo.workspace.as_str(), solo.slug.as_str()),
        ("solo", "repo")
    );
    assert_eq!(store.list_repos("Solo").expect("list").len(), 1);
    // The clashing ones are two repositories, each reachable exactly.
    let a = store.require_repo("ws", "Case1").expect("Case1");
    let b = store.require_repo("ws", "case1").expect("case1");
    assert_ne!(a.id, b.id);
    assert!(store.create_repo("ws", "CASE1", true, "").is_err());
    assert_eq!(store.list_repos("ws").expect("list").len(), 3);
    // Deleting one settles the clash: the other keeps its data and the name.
    store.delete_repo("ws", "case1").expect("delete");
    let left = store.require_repo("ws", "CASE1").expect("left");
    assert_eq!((left.id, left.slug.as_str()), (a.id, "case1"));
    drop(store);
    let store = RepoStore::open(dir.path()).expect("reopen");
    assert_eq!(store.require_repo("ws", "case1").expect("kept").id, a.id);
}
