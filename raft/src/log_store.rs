//! openraft log storage for one group, over the shared RocksDB.
//!
//! Durability: an append is written to RocksDB without sync (so it is
//! readable as soon as `append` returns, as openraft requires), then a
//! blocking task syncs the WAL (`flush_wal(true)`) and only then fires
//! openraft's IO callback. Votes are written with `sync = true` before
//! `save_vote` returns. Truncation, purge and `committed` are written
//! without sync: the node has one DB and so one WAL, whose durable part is
//! always a prefix, and every write openraft relies on (an append or a vote)
//! is synced after them, which makes them durable too; losing them in a
//! crash only brings back state from before a step nobody acknowledged.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use tracing::instrument;

use crate::db::{decode, encode, RaftDb};
use crate::error::{blocking, StoreError};
use crate::keys::{log_index, log_key, log_range_from, meta_key, GroupId, MetaKey};
use crate::types::{
    AppendCallback, Entry, GroupLogState, LogId, RaftEntry, RaftLogReader, RaftLogStorage,
    TypeConfig, Vote,
};

/// Log store of one raft group; also its log reader (clones share the DB).
#[derive(Debug, Clone)]
pub struct GroupLogStore {
    db: RaftDb,
    group: GroupId,
}

impl GroupLogStore {
    pub(crate) fn new(db: RaftDb, group: GroupId) -> Self {
        Self { db, group }
    }

    /// The group this store belongs to.
    pub fn group(&self) -> GroupId {
        self.group
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        tag: MetaKey,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.db.get_decoded(
            self.group,
            self.db.cf_meta(),
            &meta_key(self.group, tag),
            what,
        )
    }

    fn db_err(&self, op: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
        let group = self.group;
        move |source| StoreError::Db { group, op, source }
    }

    /// Log id of the last entry present in the log, if any.
    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        let (start, end) = log_range_from(self.group, 0);
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(start);
        opts.set_iterate_upper_bound(end);
        let mut iter = self
            .db
            .db()
            .iterator_cf_opt(self.db.cf_log(), opts, IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(self.db_err("log scan"))?;
                let entry: Entry = decode(self.group, "log entry", &value)?;
                Ok(Some(entry.log_id()))
            }
        }
    }

    /// Entries in `range`, failing on a hole inside what is present.
    fn read_entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let (lower, group_end) = log_range_from(self.group, start);
        let upper = match range.end_bound() {
            Bound::Included(&e) => match e.checked_add(1) {
                Some(e) => log_key(self.group, e).to_vec(),
                None => group_end,
            },
            Bound::Excluded(&e) => log_key(self.group, e).to_vec(),
            Bound::Unbounded => group_end,
        };
        if lower >= upper {
            return Ok(Vec::new());
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower);
        opts.set_iterate_upper_bound(upper);
        // One iterator reads one implicit RocksDB snapshot: the result is
        // atomic with respect to concurrent appends and truncations.
        let iter = self
            .db
            .db()
            .iterator_cf_opt(self.db.cf_log(), opts, IteratorMode::Start);
        let mut entries = Vec::new();
        let mut expected: Option<u64> = None;
        for item in iter {
            let (key, value) = item.map_err(self.db_err("log scan"))?;
            let index = log_index(self.group, &key).expect("iterator is bounded to this group");
            if let Some(expected) = expected {
                if index != expected {
                    return Err(StoreError::LogHole {
                        group: self.group,
                        expected,
                        found: index,
                    });
                }
            }
            expected = Some(index + 1);
            entries.push(decode(self.group, "log entry", &value)?);
        }
        Ok(entries)
    }

    fn write(&self, batch: WriteBatch, sync: bool, op: &'static str) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db
            .db()
            .write_opt(batch, &opts)
            .map_err(self.db_err(op))
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    #[instrument(level = "trace", skip_all, fields(group = %self.group, range = ?range))]
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        Ok(self.read_entries(range)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        Ok(self.read_meta(MetaKey::Vote, "vote")?)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<GroupLogState, std::io::Error> {
        let last_purged_log_id: Option<LogId> =
            self.read_meta(MetaKey::LastPurged, "last purged log id")?;
        let last_log_id = match self.last_entry_id()? {
            Some(id) => Some(id),
            None => last_purged_log_id,
        };
        Ok(GroupLogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, vote = %vote))]
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        let value = encode(self.group, "vote", vote)?;
        let store = self.clone();
        blocking(self.group, "save vote", move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                store.db.cf_meta(),
                meta_key(store.group, MetaKey::Vote),
                value,
            );
            // A vote must be on disk before it is acted on: a node that
            // forgets its vote could vote twice in one term.
            store.write(batch, true, "save vote")
        })
        .await?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        let key = meta_key(self.group, MetaKey::Committed);
        let mut batch = WriteBatch::default();
        match committed {
            Some(id) => batch.put_cf(
                self.db.cf_meta(),
                key,
                encode(self.group, "committed log id", &id)?,
            ),
            None => batch.delete_cf(self.db.cf_meta(), key),
        }
        Ok(self.write(batch, false, "save committed")?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        Ok(self.read_meta(MetaKey::Committed, "committed log id")?)
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group))]
    async fn append<I>(
        &mut self,
        entries: I,
        callback: AppendCallback,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let value = encode(self.group, "log entry", &entry)?;
            batch.put_cf(self.db.cf_log(), log_key(self.group, entry.index()), value);
        }
        // Unsynced write first: the entries are readable when we return.
        self.write(batch, false, "append")?;
        // Then make them durable off the executor and report to openraft.
        // Each sync covers every earlier write of the WAL, so callbacks that
        // complete out of order still never claim an unsynced entry.
        let db = self.db.db().clone();
        let group = self.group;
        tokio::task::spawn_blocking(move || {
            let result = db.flush_wal(true).map_err(|source| {
                std::io::Error::from(StoreError::Db {
                    group,
                    op: "sync wal",
                    source,
                })
            });
            callback.io_completed(result);
        });
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, after = ?last_log_id))]
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let from = match last_log_id {
            Some(id) => match id.index.checked_add(1) {
                Some(from) => from,
                None => return Ok(()),
            },
            None => 0,
        };
        let (start, end) = log_range_from(self.group, from);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.db.cf_log(), start, end);
        Ok(self.write(batch, false, "truncate")?)
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.group, upto = %log_id))]
    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let (start, group_end) = log_range_from(self.group, 0);
        let end = match log_id.index.checked_add(1) {
            Some(next) => log_key(self.group, next).to_vec(),
            None => group_end,
        };
        let mut batch = WriteBatch::default();
        // The purge marker and the deletion go in one batch: the log state
        // never shows entries at or below the last purged id.
        batch.put_cf(
            self.db.cf_meta(),
            meta_key(self.group, MetaKey::LastPurged),
            encode(self.group, "last purged log id", &log_id)?,
        );
        batch.delete_range_cf(self.db.cf_log(), start, end);
        Ok(self.write(batch, false, "purge")?)
    }
}
