//! The shard's event log over real RocksDB: which entries write an event
//! and what it says, versioned entries and rows (an unknown kind or
//! version stops applying), consumers' cursors, retention by consumers and
//! age, the size bound and the gap a reader behind it is told about; a
//! service's own kinds and rows registered beside them.

mod common;
use common::StateFixture as Fixture;

use std::sync::Arc;

use cairn_raft::{GroupState, StateView};
use cairn_storage_node::shard::entry::{Entry, EntryKinds};
use cairn_storage_node::shard::events::{self, Ack, Event, EventKind, Register, Retention};
use cairn_storage_node::shard::state::{
    git_kinds, keys, CreateRepo, DeleteRepo, LoggedUpdate, Push, ShardRequest,
};

const T0: i64 = 1_800_000_000_000;

/// An entry of `kind` at time `at_ms`, as a leader would propose it.
fn entry<T: serde::Serialize>(kind: &str, at_ms: i64, payload: &T) -> ShardRequest {
    let mut e = Entry::new(kind, 1, Some("alice".into()), payload);
    e.at_ms = at_ms;
    ShardRequest::Entry(e)
}

fn create(slug: &str, at_ms: i64) -> ShardRequest {
    entry(
        git_kinds::CREATE,
        at_ms,
        &CreateRepo {
            workspace: "w".into(),
            slug: slug.into(),
            is_private: true,
            description: String::new(),
        },
    )
}

fn update(name: &str, old: u8, new: u8) -> LoggedUpdate {
    LoggedUpdate {
        name: name.into(),
        old: [old; 20],
        new: [new; 20],
    }
}

fn push(repo_id: u64, id: &str, updates: Vec<LoggedUpdate>, at_ms: i64) -> ShardRequest {
    let n = updates.len();
    entry(
        git_kinds::PUSH,
        at_ms,
        &Push {
            repo_id,
            push_id: id.into(),
            pack: None,
            updates,
            atomic: false,
            prior: vec![None; n],
            push_options: vec!["ci.skip".into()],
        },
    )
}

fn all_events(view: &StateView) -> events::Read {
    events::read(view, 0, 1000).expect("read")
}

fn hex(n: u8) -> String {
    [n; 20].iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn every_applied_change_is_an_event_in_log_order() {
    let mut f = Fixture::new();
    f.apply(&create("app", T0)).await.expect("create");
    let id = f.repo("w", "app").expect("created").id;
    // Refs point at objects no pack holds: apply does not look (the
    // leader checked connectivity), and no pack means none to place.
    f.apply(&push(
        id,
        "p1",
        vec![update("refs/heads/main", 0, 1)],
        T0 + 1,
    ))
    .await
    .expect("push");
    // One update stale, one fine: only the applied one is in the event.
    f.apply(&push(
        id,
        "p2",
        vec![
            update("refs/heads/main", 9, 2),
            update("refs/heads/dev", 0, 3),
        ],
        T0 + 2,
    ))
    .await
    .expect("push");
    // Nothing applied: no event.
    f.apply(&push(
        id,
        "p3",
        vec![update("refs/heads/main", 9, 4)],
        T0 + 3,
    ))
    .await
    .expect("push");
    f.apply(&entry(
        git_kinds::DELETE,
        T0 + 4,
        &DeleteRepo {
            workspace: "w".into(),
            slug: "app".into(),
        },
    ))
    .await
    .expect("delete");

    let read = all_events(&f.view());
    assert_eq!(read.gap, None);
    type Change = (String, String, String);
    let summary: Vec<(u64, EventKind, Vec<Change>)> = read
        .events
        .iter()
        .map(|e| {
            (
                e.index,
                e.kind,
                e.changes
                    .iter()
                    .map(|c| (c.name.clone(), c.old.clone(), c.new.clone()))
                    .collect(),
            )
        })
        .collect();
    let ch = |n: &str, o: u8, w: u8| (n.to_owned(), hex(o), hex(w));
    assert_eq!(
        summary,
        vec![
            (1, EventKind::RepoCreated, vec![]),
            (2, EventKind::Push, vec![ch("refs/heads/main", 0, 1)]),
            (3, EventKind::Push, vec![ch("refs/heads/dev", 0, 3)]),
            (
                5,
                EventKind::RepoDeleted,
                vec![ch("refs/heads/dev", 3, 0), ch("refs/heads/main", 1, 0)]
            ),
        ]
    );
    let e: &Event = &read.events[1];
    assert_eq!(e.repository, "w/app");
    assert_eq!(e.repo_id, id);
    assert_eq!(e.at_ms, T0 + 1);
    assert_eq!(e.actor.as_deref(), Some("alice"));
    assert_eq!(e.push_options, vec!["ci.skip".to_owned()]);
    // Reading after a position gives what follows it.
    let later = events::read(&f.view(), 2, 10).expect("read");
    assert_eq!(
        later.events.iter().map(|e| e.index).collect::<Vec<_>>(),
        [3, 5]
    );
}

#[tokio::test]
async fn entries_of_earlier_releases_apply_as_before_without_events() {
    let mut f = Fixture::new();
    f.apply(&ShardRequest::CreateRepo {
        workspace: "w".into(),
        slug: "old".into(),
        is_private: true,
        description: String::new(),
        created_at: 1,
    })
    .await
    .expect("legacy create");
    let id = f.repo("w", "old").expect("created").id;
    f.apply(&ShardRequest::Push {
        repo_id: id,
        push_id: "legacy".into(),
        pack: None,
        updates: vec![update("refs/heads/main", 0, 7)],
        atomic: false,
        prior: vec![None],
    })
    .await
    .expect("legacy push");
    // Unversioned rows, as those entries always wrote them.
    let row = f
        .view()
        .get(&keys::ref_(id, "refs/heads/main"))
        .expect("read")
        .expect("ref");
    assert_eq!(row, vec![7u8; 20]);
    assert!(all_events(&f.view()).events.is_empty());
    // A versioned push writes a versioned row.
    f.apply(&push(id, "new", vec![update("refs/heads/main", 7, 8)], T0))
        .await
        .expect("push");
    let row = f
        .view()
        .get(&keys::ref_(id, "refs/heads/main"))
        .expect("read")
        .expect("ref");
    assert_eq!(row[0], 1, "format version first");
    assert_eq!(&row[1..], &[8u8; 20]);
}

#[tokio::test]
async fn an_unknown_kind_or_version_stops_applying() {
    let mut f = Fixture::new();
    f.apply(&create("app", T0)).await.expect("create");
    let applied = |f: &Fixture| f.view().applied().expect("applied").map(|l| l.index());
    assert_eq!(applied(&f), Some(1));

    let unknown = entry("pullrequest.create", T0, &"x");
    let err = f.apply(&unknown).await.expect_err("unknown kind");
    assert!(format!("{err:?}").contains("pullrequest.create"), "{err:?}");
    assert_eq!(applied(&f), Some(1), "nothing applied");

    let mut newer = Entry::new(git_kinds::PUSH, 2, None, &"future format");
    newer.at_ms = T0;
    let mut g = Fixture::new();
    g.apply(&create("app", T0)).await.expect("create");
    let err = g
        .apply(&ShardRequest::Entry(newer))
        .await
        .expect_err("newer version");
    assert!(format!("{err:?}").contains("version: 2"), "{err:?}");
    assert_eq!(applied(&g), Some(1));
}

#[tokio::test]
async fn events_stay_until_every_consumer_passed_them_and_the_minimum_age() {
    let mut f = Fixture::new();
    let min_age = 60_000;
    f.apply(&entry(
        events::kinds::RETENTION,
        T0,
        &Retention {
            min_age_ms: min_age,
            max_events: 1000,
            max_bytes: 1 << 30,
        },
    ))
    .await
    .expect("retention");
    for name in ["a", "b"] {
        f.apply(&entry(
            events::kinds::REGISTER,
            T0,
            &Register {
                consumer: name.into(),
                from: Some(0),
            },
        ))
        .await
        .expect("register");
    }
    f.apply(&create("app", T0)).await.expect("create");
    let id = f.repo("w", "app").expect("created").id;
    for n in 1..=4u8 {
        f.apply(&push(
            id,
            &format!("p{n}"),
            vec![update("refs/heads/main", n - 1, n)],
            T0 + i64::from(n),
        ))
        .await
        .expect("push");
    }
    let indexes = |f: &Fixture| {
        all_events(&f.view())
            .events
            .iter()
            .map(|e| e.index)
            .collect::<Vec<_>>()
    };
    assert_eq!(indexes(&f), [4, 5, 6, 7, 8]);
    let ack = |who: &str, position: u64, at: i64| {
        entry(
            events::kinds::ACK,
            at,
            &Ack {
                consumer: who.into(),
                position,
            },
        )
    };
    // a passed everything, b only the first two: nothing goes while young.
    f.apply(&ack("a", 8, T0 + 10)).await.expect("ack");
    f.apply(&ack("b", 5, T0 + 10)).await.expect("ack");
    assert_eq!(indexes(&f), [4, 5, 6, 7, 8]);
    // Old enough: what both passed goes, what b has not stays.
    f.apply(&ack("b", 5, T0 + min_age + 100))
        .await
        .expect("ack");
    assert_eq!(indexes(&f), [6, 7, 8]);
    // Cursors only move forward.
    f.apply(&ack("a", 2, T0 + min_age + 200))
        .await
        .expect("ack");
    assert_eq!(
        events::consumer(&f.view(), "a").expect("read"),
        Some(events::Consumer { position: 8 })
    );
    // Nobody is behind what went: no gap for b.
    let from_b = events::read(&f.view(), 5, 10).expect("read");
    assert_eq!(from_b.gap, None);
    assert_eq!(from_b.events.first().map(|e| e.index), Some(6));
}

#[tokio::test]
async fn at_the_bound_the_oldest_go_and_a_reader_behind_learns_of_its_gap() {
    let mut f = Fixture::new();
    f.apply(&entry(
        events::kinds::RETENTION,
        T0,
        &Retention {
            min_age_ms: 3_600_000,
            max_events: 3,
            max_bytes: 1 << 30,
        },
    ))
    .await
    .expect("retention");
    // A consumer that never acks must not hold the log forever.
    f.apply(&entry(
        events::kinds::REGISTER,
        T0,
        &Register {
            consumer: "slow".into(),
            from: Some(0),
        },
    ))
    .await
    .expect("register");
    f.apply(&create("app", T0)).await.expect("create");
    let id = f.repo("w", "app").expect("created").id;
    for n in 1..=6u8 {
        f.apply(&push(
            id,
            &format!("p{n}"),
            vec![update("refs/heads/main", n - 1, n)],
            T0 + i64::from(n),
        ))
        .await
        .expect("a push is never held up by a slow consumer");
    }
    assert_eq!(f.refs(id).len(), 1);
    let read = events::read(&f.view(), 0, 100).expect("read");
    let kept: Vec<u64> = read.events.iter().map(|e| e.index).collect();
    assert_eq!(kept, [7, 8, 9], "the newest three");
    assert_eq!(read.gap, Some((1, 6)), "what the slow reader missed");
    // Its cursor did not move; it reconciles, then acks past the gap.
    assert_eq!(
        events::consumer(&f.view(), "slow").expect("read"),
        Some(events::Consumer { position: 0 })
    );
    let caught_up = events::read(&f.view(), 6, 100).expect("read");
    assert_eq!(caught_up.gap, None);
    assert_eq!(caught_up.events.len(), 3);
    // A tighter bound acts with the entry that sets it, not the next push.
    f.apply(&entry(
        events::kinds::RETENTION,
        T0 + 10,
        &Retention {
            min_age_ms: 3_600_000,
            max_events: 1,
            max_bytes: 1 << 30,
        },
    ))
    .await
    .expect("retention");
    let kept: Vec<u64> = all_events(&f.view())
        .events
        .iter()
        .map(|e| e.index)
        .collect();
    assert_eq!(kept, [9]);
}

#[tokio::test]
async fn an_ack_that_passes_old_events_removes_them_at_once() {
    let mut f = Fixture::new();
    f.apply(&entry(
        events::kinds::RETENTION,
        T0,
        &Retention {
            min_age_ms: 0,
            max_events: 1000,
            max_bytes: 1 << 30,
        },
    ))
    .await
    .expect("retention");
    f.apply(&entry(
        events::kinds::REGISTER,
        T0,
        &Register {
            consumer: "only".into(),
            from: Some(0),
        },
    ))
    .await
    .expect("register");
    f.apply(&create("app", T0)).await.expect("create");
    let id = f.repo("w", "app").expect("created").id;
    for n in 1..=3u8 {
        f.apply(&push(
            id,
            &format!("p{n}"),
            vec![update("refs/heads/main", n - 1, n)],
            T0 + i64::from(n),
        ))
        .await
        .expect("push");
    }
    let indexes = |f: &Fixture| -> Vec<u64> {
        all_events(&f.view())
            .events
            .iter()
            .map(|e| e.index)
            .collect()
    };
    assert_eq!(indexes(&f), [3, 4, 5, 6]);
    f.apply(&entry(
        events::kinds::ACK,
        T0 + 10,
        &Ack {
            consumer: "only".into(),
            position: 5,
        },
    ))
    .await
    .expect("ack");
    assert_eq!(indexes(&f), [6], "passed and old enough: gone with the ack");
}

/// A service's kinds as a later one would add them: a note per repository
/// under its own rows.
struct Notes {
    rows: &'static [&'static [u8]],
}

impl EntryKinds for Notes {
    fn kinds(&self) -> &'static [(&'static str, u16)] {
        &[("notes.add", 1)]
    }

    fn row_prefixes(&self) -> &'static [&'static [u8]] {
        self.rows
    }

    fn apply(
        &self,
        state: &mut GroupState<'_>,
        entry: &Entry,
    ) -> Result<Vec<u8>, cairn_storage_node::shard::state::ApplyError> {
        let text: String = entry.decode()?;
        let mut key = self.rows[0].to_vec();
        key.extend_from_slice(&state.log_id().index().to_be_bytes());
        state.put(&key, text.as_bytes());
        Ok(text.len().to_le_bytes().to_vec())
    }
}

#[tokio::test]
async fn a_service_adds_kinds_and_rows_without_editing_the_shard() {
    let mut f = Fixture::with_kinds(vec![Arc::new(Notes { rows: &[b"v/"] })]);
    f.apply(&create("app", T0)).await.expect("create");
    f.apply(&entry("notes.add", T0, &"hello".to_owned()))
        .await
        .expect("a registered kind applies");
    let rows = f.view().scan_prefix(b"v/").expect("scan");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, b"hello");
    // A version newer than the service reads stops applying, as for git's.
    let mut newer = Entry::new("notes.add", 2, None, &"x".to_owned());
    newer.at_ms = T0;
    let err = f
        .apply(&ShardRequest::Entry(newer))
        .await
        .expect_err("newer version");
    assert!(format!("{err:?}").contains("notes.add"), "{err:?}");
}

#[test]
fn kinds_and_row_families_must_not_overlap() {
    let logic = |rows: &'static [&'static [u8]]| {
        let dir = tempfile::tempdir().expect("tempdir");
        let area = cairn_storage_node::packs::transfer::StagingArea::at(dir.path());
        cairn_storage_node::shard::state::ShardLogic::with_kinds(
            cairn_storage_node::packs::placer::LocalPackPlacer::new(area),
            vec![Arc::new(Notes { rows }) as Arc<dyn EntryKinds>],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert_eq!(logic(&[b"v/"]), Ok(()));
    // Inside the event log's rows, or around the git rows: refused.
    let err = logic(&[b"e/notes"]).expect_err("overlaps events");
    assert!(err.contains("events.register"), "{err}");
    let err = logic(&[b"r"]).expect_err("overlaps repositories");
    assert!(err.contains("git"), "{err}");
}
