//! cairn-raft storage over a real RocksDB: openraft's conformance suite,
//! group isolation in one DB, persistence across reopen, and snapshots.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_raft::types::{Entry, LogId, Membership, StoredMembership, Vote};
use cairn_raft::{
    ApplyLogic, Command, GroupId, GroupLogStore, GroupState, GroupStateMachine, RaftDb,
    SnapshotFile, TypeConfig,
};
use openraft::entry::RaftEntry;
use openraft::storage::{
    RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Fixture: a small key-value ApplyLogic (a real implementation of the trait).

#[derive(Debug, Serialize, Deserialize)]
enum KvRequest {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// Sets `key` to `new` only if it currently holds `expected`.
    CompareAndSet {
        key: String,
        expected: Option<String>,
        new: String,
    },
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct KvResponse {
    applied: bool,
    previous: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum KvError {
    #[error("state read failed")]
    State(#[from] cairn_raft::StoreError),
    #[error("stored value is not utf-8")]
    Utf8(#[from] std::string::FromUtf8Error),
}

struct KvLogic;

impl ApplyLogic for KvLogic {
    type Request = KvRequest;
    type Response = KvResponse;
    type Error = KvError;

    fn apply(&self, state: &mut GroupState<'_>, request: KvRequest) -> Result<KvResponse, KvError> {
        let read = |state: &GroupState<'_>, key: &str| -> Result<Option<String>, KvError> {
            Ok(state
                .get(key.as_bytes())?
                .map(String::from_utf8)
                .transpose()?)
        };
        Ok(match request {
            KvRequest::Put { key, value } => {
                let previous = read(state, &key)?;
                state.put(key.as_bytes(), value.as_bytes());
                KvResponse {
                    applied: true,
                    previous,
                }
            }
            KvRequest::Delete { key } => {
                let previous = read(state, &key)?;
                state.delete(key.as_bytes());
                KvResponse {
                    applied: true,
                    previous,
                }
            }
            KvRequest::CompareAndSet { key, expected, new } => {
                let previous = read(state, &key)?;
                let applied = previous == expected;
                if applied {
                    state.put(key.as_bytes(), new.as_bytes());
                }
                KvResponse { applied, previous }
            }
        })
    }
}

type Sm = GroupStateMachine<KvLogic>;

fn open_db(dir: &Path) -> RaftDb {
    RaftDb::open(&dir.join("rocksdb"), &dir.join("snapshots")).expect("open raft db")
}

// ---------------------------------------------------------------------------
// openraft's storage conformance suite.

/// Every build gets its own RocksDB in its own temporary directory.
struct FreshDbBuilder;

impl StoreBuilder<TypeConfig, GroupLogStore, Sm, TempDir> for FreshDbBuilder {
    async fn build(&self) -> Result<(TempDir, GroupLogStore, Sm), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("tempdir");
        let db = open_db(dir.path());
        let group = GroupId(7);
        let sm = db.state_machine(group, KvLogic).expect("state machine");
        Ok((dir, db.log_store(group), sm))
    }
}

/// Every build is a new group in one shared RocksDB: the suite then also
/// proves that groups do not see each other (each test starts from an
/// empty group while earlier tests' groups hold data next to it).
struct SharedDbBuilder {
    _dir: TempDir,
    db: RaftDb,
    next_group: AtomicU64,
}

impl StoreBuilder<TypeConfig, GroupLogStore, Sm, ()> for SharedDbBuilder {
    async fn build(&self) -> Result<((), GroupLogStore, Sm), StorageError<TypeConfig>> {
        // Neighbouring ids on purpose: off-by-one range bounds would leak.
        let group = GroupId(self.next_group.fetch_add(1, Ordering::Relaxed));
        let sm = self
            .db
            .state_machine(group, KvLogic)
            .expect("state machine");
        Ok(((), self.db.log_store(group), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_fresh_db_per_test() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(FreshDbBuilder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_many_groups_in_one_db() -> Result<(), StorageError<TypeConfig>> {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    Suite::test_all(SharedDbBuilder {
        _dir: dir,
        db,
        next_group: AtomicU64::new(u64::MAX - 60),
    })
    .await
}

// ---------------------------------------------------------------------------
// Helpers.

fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(term, 1, index)
}

fn blank(term: u64, index: u64) -> Entry {
    Entry::new_blank(log_id(term, index))
}

fn kv(term: u64, index: u64, request: &KvRequest) -> Entry {
    Entry::new_normal(
        log_id(term, index),
        Command::encode(request).expect("encode"),
    )
}

fn put(key: &str, value: &str) -> KvRequest {
    KvRequest::Put {
        key: key.into(),
        value: value.into(),
    }
}

fn membership(index: u64, voters: &[u64]) -> Entry {
    Entry::new_membership(
        log_id(1, index),
        Membership::new_with_defaults(vec![voters.iter().copied().collect::<BTreeSet<_>>()], []),
    )
}

async fn apply(sm: &mut Sm, entries: Vec<Entry>) -> std::io::Result<()> {
    let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await
}

async fn indexes(store: &mut GroupLogStore) -> Vec<u64> {
    store
        .try_get_log_entries(0..)
        .await
        .expect("read log")
        .iter()
        .map(|e| e.index())
        .collect()
}

fn value(db: &RaftDb, group: GroupId, key: &str) -> Option<String> {
    db.state_view(group)
        .get(key.as_bytes())
        .expect("state read")
        .map(|v| String::from_utf8(v).expect("utf-8"))
}

// ---------------------------------------------------------------------------
// Groups in one DB.

#[tokio::test]
async fn groups_sharing_a_db_do_not_see_each_others_log_or_vote() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let (a, b, c) = (GroupId(1), GroupId(2), GroupId(3));
    let mut log_a = db.log_store(a);
    let mut log_b = db.log_store(b);
    let mut log_c = db.log_store(c);

    log_a
        .blocking_append((0..=5).map(|i| blank(1, i)))
        .await
        .expect("append a");
    log_b
        .blocking_append((0..=2).map(|i| blank(3, i)))
        .await
        .expect("append b");
    log_a
        .save_vote(&Vote::new_committed(4, 9))
        .await
        .expect("vote a");
    log_a
        .save_committed(Some(log_id(1, 5)))
        .await
        .expect("committed a");

    assert_eq!(indexes(&mut log_a).await, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(indexes(&mut log_b).await, vec![0, 1, 2]);
    assert_eq!(indexes(&mut log_c).await, Vec::<u64>::new());
    assert_eq!(
        log_b.try_get_log_entries(0..).await.expect("read")[2].log_id(),
        log_id(3, 2)
    );
    assert_eq!(log_b.read_vote().await.expect("vote b"), None);
    assert_eq!(log_b.read_committed().await.expect("committed b"), None);
    assert_eq!(
        log_c.get_log_state().await.expect("state c").last_log_id,
        None
    );

    // Purge and truncation of one group leave the neighbours intact.
    log_a.purge(log_id(1, 3)).await.expect("purge a");
    log_b
        .truncate_after(Some(log_id(3, 0)))
        .await
        .expect("truncate b");
    assert_eq!(indexes(&mut log_a).await, vec![4, 5]);
    assert_eq!(indexes(&mut log_b).await, vec![0]);
    let state_b = log_b.get_log_state().await.expect("state b");
    assert_eq!(state_b.last_purged_log_id, None);
    assert_eq!(state_b.last_log_id, Some(log_id(3, 0)));
    log_b.truncate_after(None).await.expect("truncate all b");
    assert_eq!(indexes(&mut log_a).await, vec![4, 5]);
    assert_eq!(
        log_a.read_vote().await.expect("vote a"),
        Some(Vote::new_committed(4, 9))
    );
}

#[tokio::test]
async fn groups_sharing_a_db_do_not_see_each_others_state() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let (a, b) = (GroupId(10), GroupId(11));
    let mut sm_a = db.state_machine(a, KvLogic).expect("sm a");
    let mut sm_b = db.state_machine(b, KvLogic).expect("sm b");

    apply(
        &mut sm_a,
        vec![
            membership(1, &[1, 2, 3]),
            kv(1, 2, &put("refs/heads/main", "a1")),
        ],
    )
    .await
    .expect("apply a");
    apply(&mut sm_b, vec![kv(2, 1, &put("refs/heads/dev", "b1"))])
        .await
        .expect("apply b");

    assert_eq!(value(&db, a, "refs/heads/main").as_deref(), Some("a1"));
    assert_eq!(value(&db, a, "refs/heads/dev"), None);
    assert_eq!(value(&db, b, "refs/heads/dev").as_deref(), Some("b1"));
    assert_eq!(value(&db, b, "refs/heads/main"), None);

    let (applied_b, membership_b) = sm_b.applied_state().await.expect("applied b");
    assert_eq!(applied_b, Some(log_id(2, 1)));
    assert_eq!(membership_b, StoredMembership::default());
    let (applied_a, membership_a) = sm_a.applied_state().await.expect("applied a");
    assert_eq!(applied_a, Some(log_id(1, 2)));
    assert_eq!(membership_a.log_id(), &Some(log_id(1, 1)));
}

// ---------------------------------------------------------------------------
// Applying commands.

#[tokio::test]
async fn apply_runs_the_logic_and_records_the_applied_id_with_its_writes() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let g = GroupId(5);
    let mut sm = db.state_machine(g, KvLogic).expect("sm");

    apply(
        &mut sm,
        vec![
            kv(1, 1, &put("k", "v1")),
            // Sees entry 1's write: each entry commits before the next runs.
            kv(
                1,
                2,
                &KvRequest::CompareAndSet {
                    key: "k".into(),
                    expected: Some("v1".into()),
                    new: "v2".into(),
                },
            ),
            // Stale expectation: rejected, state unchanged, still applied.
            kv(
                1,
                3,
                &KvRequest::CompareAndSet {
                    key: "k".into(),
                    expected: Some("v1".into()),
                    new: "v3".into(),
                },
            ),
            kv(1, 4, &put("gone", "x")),
            kv(1, 5, &KvRequest::Delete { key: "gone".into() }),
            blank(2, 6),
        ],
    )
    .await
    .expect("apply");

    assert_eq!(value(&db, g, "k").as_deref(), Some("v2"));
    assert_eq!(value(&db, g, "gone"), None);
    assert_eq!(
        db.state_view(g).applied().expect("applied"),
        Some(log_id(2, 6))
    );
    let rows = db.state_view(g).scan_prefix(b"").expect("scan");
    assert_eq!(rows, vec![(b"k".to_vec(), b"v2".to_vec())]);
}

#[tokio::test]
async fn an_undecodable_command_fails_apply_without_advancing_applied() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let g = GroupId(5);
    let mut sm = db.state_machine(g, KvLogic).expect("sm");
    apply(&mut sm, vec![kv(1, 1, &put("k", "v"))])
        .await
        .expect("apply");

    let garbage = Entry::new_normal(log_id(1, 2), Command(vec![0xff, 0xff, 0xff]));
    let err = apply(&mut sm, vec![garbage]).await.expect_err("must fail");
    assert!(err.to_string().contains("applying entry 2"), "{err}");
    assert_eq!(
        db.state_view(g).applied().expect("applied"),
        Some(log_id(1, 1))
    );
}

// ---------------------------------------------------------------------------
// Persistence.

#[tokio::test]
async fn state_survives_reopening_the_db() {
    let dir = TempDir::new().expect("tempdir");
    let g = GroupId(42);
    let snapshot_meta;
    {
        let db = open_db(dir.path());
        let mut log = db.log_store(g);
        let mut sm = db.state_machine(g, KvLogic).expect("sm");
        let entries = vec![
            blank(1, 0),
            membership(1, &[1, 2, 3]),
            kv(1, 2, &put("refs/heads/main", "c0ffee")),
            kv(2, 3, &put("refs/tags/v1", "beef")),
        ];
        log.blocking_append(entries.clone()).await.expect("append");
        log.save_vote(&Vote::new_committed(2, 1))
            .await
            .expect("vote");
        log.save_committed(Some(log_id(2, 3)))
            .await
            .expect("committed");
        log.purge(log_id(1, 0)).await.expect("purge");
        apply(&mut sm, entries[..3].to_vec()).await.expect("apply");
        let snap = sm
            .try_create_snapshot_builder(true)
            .await
            .expect("builder")
            .build_snapshot()
            .await
            .expect("snapshot");
        snapshot_meta = snap.meta;
        apply(&mut sm, entries[3..].to_vec())
            .await
            .expect("apply rest");
    }

    let db = open_db(dir.path());
    let mut log = db.log_store(g);
    let mut sm = db.state_machine(g, KvLogic).expect("sm");
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 0)));
    assert_eq!(state.last_log_id, Some(log_id(2, 3)));
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
    assert_eq!(
        log.read_vote().await.expect("vote"),
        Some(Vote::new_committed(2, 1))
    );
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(2, 3))
    );

    let (applied, membership) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(2, 3)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(value(&db, g, "refs/heads/main").as_deref(), Some("c0ffee"));
    assert_eq!(value(&db, g, "refs/tags/v1").as_deref(), Some("beef"));

    let current = sm
        .get_current_snapshot()
        .await
        .expect("read snapshot")
        .expect("snapshot survives");
    assert_eq!(current.meta, snapshot_meta);
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 2)));
}

// ---------------------------------------------------------------------------
// Snapshots.

async fn group_with_rows(
    db: &RaftDb,
    g: GroupId,
) -> (Sm, cairn_raft::types::Snapshot<SnapshotFile>) {
    let mut sm = db.state_machine(g, KvLogic).expect("sm");
    apply(
        &mut sm,
        vec![
            membership(1, &[1, 2, 3]),
            kv(1, 2, &put("refs/heads/main", "1111")),
            kv(1, 3, &put("refs/heads/topic", "2222")),
        ],
    )
    .await
    .expect("apply");
    let snap = sm
        .try_create_snapshot_builder(true)
        .await
        .expect("builder")
        .build_snapshot()
        .await
        .expect("build");
    (sm, snap)
}

#[tokio::test]
async fn installing_a_snapshot_replaces_only_the_target_groups_rows() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let (leader, follower, neighbour) = (GroupId(20), GroupId(21), GroupId(22));
    let (_sm_l, snap) = group_with_rows(&db, leader).await;

    let mut sm_f = db.state_machine(follower, KvLogic).expect("sm f");
    let mut sm_n = db.state_machine(neighbour, KvLogic).expect("sm n");
    // Rows the snapshot does not have must disappear from the follower.
    apply(&mut sm_f, vec![kv(1, 1, &put("refs/heads/stale", "dead"))])
        .await
        .expect("apply f");
    apply(&mut sm_n, vec![kv(1, 1, &put("refs/heads/own", "9999"))])
        .await
        .expect("apply n");

    // Stream the leader's file into the follower's incoming file, as the
    // network layer will.
    let mut incoming = sm_f.incoming_snapshot().expect("incoming");
    let incoming_path = incoming.path().to_path_buf();
    let mut bytes = Vec::new();
    let mut source = snap.snapshot;
    source.read_to_end(&mut bytes).expect("read snapshot");
    incoming.write_all(&bytes).expect("write incoming");
    sm_f.install_snapshot(&snap.meta, incoming)
        .await
        .expect("install");

    assert_eq!(
        value(&db, follower, "refs/heads/main").as_deref(),
        Some("1111")
    );
    assert_eq!(
        value(&db, follower, "refs/heads/topic").as_deref(),
        Some("2222")
    );
    assert_eq!(value(&db, follower, "refs/heads/stale"), None);
    assert_eq!(
        value(&db, neighbour, "refs/heads/own").as_deref(),
        Some("9999")
    );
    assert_eq!(value(&db, neighbour, "refs/heads/main"), None);
    assert_eq!(
        sm_f.applied_state().await.expect("applied"),
        (snap.meta.last_log_id, snap.meta.last_membership.clone())
    );
    let current = sm_f
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("installed snapshot is current");
    assert_eq!(current.meta, snap.meta);
    // The incoming file was adopted, not left behind under its old name.
    assert!(!incoming_path.exists());
}

#[tokio::test]
async fn a_corrupt_snapshot_is_rejected_and_changes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let db = open_db(dir.path());
    let (leader, follower) = (GroupId(30), GroupId(31));
    let (_sm_l, snap) = group_with_rows(&db, leader).await;
    let mut sm_f = db.state_machine(follower, KvLogic).expect("sm f");
    apply(&mut sm_f, vec![kv(1, 1, &put("refs/heads/own", "7777"))])
        .await
        .expect("apply f");

    let mut bytes = Vec::new();
    let mut source = snap.snapshot;
    source.read_to_end(&mut bytes).expect("read snapshot");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let mut incoming = sm_f.incoming_snapshot().expect("incoming");
    incoming.write_all(&bytes).expect("write incoming");

    let err = sm_f
        .install_snapshot(&snap.meta, incoming)
        .await
        .expect_err("corrupt snapshot must be rejected");
    assert!(format!("{:?}", err).contains("Corrupt"), "{err:?}");
    assert_eq!(
        value(&db, follower, "refs/heads/own").as_deref(),
        Some("7777")
    );
    assert_eq!(value(&db, follower, "refs/heads/main"), None);
    assert_eq!(
        sm_f.applied_state().await.expect("applied").0,
        Some(log_id(1, 1))
    );
    assert!(sm_f
        .get_current_snapshot()
        .await
        .expect("current")
        .is_none());
}

#[tokio::test]
async fn reopening_removes_snapshot_files_no_pointer_names() {
    let dir = TempDir::new().expect("tempdir");
    let g = GroupId(50);
    let group_dir = dir.path().join("snapshots").join(format!("{:016x}", g.0));
    {
        let db = open_db(dir.path());
        let (sm, _snap) = group_with_rows(&db, g).await;
        // A crash mid-receive leaves an incoming file behind.
        let incoming = sm.incoming_snapshot().expect("incoming");
        std::mem::forget(incoming);
        // A newer build replaces the older file.
        let mut sm = sm;
        sm.try_create_snapshot_builder(true)
            .await
            .expect("builder")
            .build_snapshot()
            .await
            .expect("build");
    }
    let files = |d: &Path| std::fs::read_dir(d).expect("dir").count();
    assert_eq!(files(&group_dir), 2, "current snapshot + leftover incoming");
    let db = open_db(dir.path());
    let mut sm = db.state_machine(g, KvLogic).expect("sm");
    assert_eq!(files(&group_dir), 1);
    assert!(sm.get_current_snapshot().await.expect("current").is_some());
}

#[test]
fn a_db_without_the_raft_column_families_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir.path().join("plain")).expect("open plain db");
    let err =
        RaftDb::with_db(Arc::new(db), &dir.path().join("snapshots")).expect_err("must refuse");
    assert!(matches!(
        err,
        cairn_raft::OpenError::MissingColumnFamily { name: "raft_log" }
    ));
}
