//! Column families and key layout shared by all groups in one RocksDB.
//!
//! Every key starts with the group id as a big-endian u64, so one group's
//! keys are one contiguous range in each column family and a range delete
//! or a bounded iterator never touches another group.
//!
//! | cf           | key                              | value                    |
//! |--------------|----------------------------------|--------------------------|
//! | `raft_log`   | group ‖ index (u64 BE)           | postcard(`Entry`)        |
//! | `raft_meta`  | group ‖ tag (1 byte)             | postcard(vote / log id)  |
//! | `raft_state` | group ‖ 0x00 ‖ tag               | state machine's own rows |
//! | `raft_state` | group ‖ 0x01 ‖ application key   | application value        |

use std::fmt;

use serde::{Deserialize, Serialize};

/// Column family of raft log entries.
pub const CF_LOG: &str = "raft_log";
/// Column family of per-group raft metadata (vote, committed, last purged).
pub const CF_META: &str = "raft_meta";
/// Column family of replicated state: the state machine's applied position
/// and membership, and the application's rows.
pub const CF_STATE: &str = "raft_state";

/// All column families this crate needs; whoever opens the DB must open them.
pub const COLUMN_FAMILIES: [&str; 3] = [CF_LOG, CF_META, CF_STATE];

/// Id of one raft group (a shard; group 0 is the meta group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl GroupId {
    /// The key prefix of this group in every column family.
    pub fn prefix(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Exclusive upper bound of this group's log keys: `prefix ‖ ff*8 ‖ 00`
    /// sorts after `prefix ‖ u64::MAX` and before the next group's prefix.
    fn log_upper_bound(self) -> Vec<u8> {
        let mut key = Vec::with_capacity(17);
        key.extend_from_slice(&self.prefix());
        key.extend_from_slice(&[0xff; 8]);
        key.push(0);
        key
    }
}

/// Key of log entry `index` of `group`.
pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.prefix());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Index encoded in a log key of `group`, or `None` if the key is not one.
pub fn log_index(group: GroupId, key: &[u8]) -> Option<u64> {
    if key.len() != 16 || key[..8] != group.prefix() {
        return None;
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&key[8..]);
    Some(u64::from_be_bytes(index))
}

/// `[start, end)` keys covering log indexes `from..` of `group`.
pub fn log_range_from(group: GroupId, from: u64) -> (Vec<u8>, Vec<u8>) {
    (log_key(group, from).to_vec(), group.log_upper_bound())
}

/// Tags of the rows in `raft_meta`.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum MetaKey {
    Vote = 1,
    Committed = 2,
    LastPurged = 3,
}

/// Key of a metadata row of `group`.
pub fn meta_key(group: GroupId, tag: MetaKey) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&group.prefix());
    key[8] = tag as u8;
    key
}

/// Sub-space of `raft_state` rows the state machine keeps for itself.
const STATE_INTERNAL: u8 = 0x00;
/// Sub-space of `raft_state` rows written by the application.
const STATE_APP: u8 = 0x01;

/// Tags of the state machine's own rows in `raft_state`.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum StateKey {
    /// Last applied log id; written in the same batch as the entry's effects.
    Applied = 1,
    /// Last applied membership.
    Membership = 2,
    /// Metadata and file name of the group's current snapshot.
    CurrentSnapshot = 3,
    /// A snapshot install whose rows are being written in several batches;
    /// present only until its last batch commits.
    Installing = 4,
}

/// Key of a state machine row of `group`.
pub fn state_key(group: GroupId, tag: StateKey) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..8].copy_from_slice(&group.prefix());
    key[8] = STATE_INTERNAL;
    key[9] = tag as u8;
    key
}

/// Prefix of the application's rows of `group`.
pub fn app_prefix(group: GroupId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&group.prefix());
    key[8] = STATE_APP;
    key
}

/// Key of the application row `key` of `group`.
pub fn app_key(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(9 + key.len());
    full.extend_from_slice(&app_prefix(group));
    full.extend_from_slice(key);
    full
}

/// `[start, end)` covering every application row of `group`: the end is the
/// next sub-space tag, so no application key can fall outside it.
pub fn app_range(group: GroupId) -> ([u8; 9], [u8; 9]) {
    let start = app_prefix(group);
    let mut end = start;
    end[8] = STATE_APP + 1;
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        let keys = [
            log_key(GroupId(1), 0),
            log_key(GroupId(1), 1),
            log_key(GroupId(1), 256),
            log_key(GroupId(1), u64::MAX),
            log_key(GroupId(2), 0),
        ];
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(log_index(GroupId(1), &keys[2]), Some(256));
        assert_eq!(log_index(GroupId(2), &keys[2]), None);
    }

    #[test]
    fn log_range_covers_exactly_one_group() {
        let (start, end) = log_range_from(GroupId(7), 5);
        assert!(log_key(GroupId(7), 4).as_slice() < start.as_slice());
        assert!(log_key(GroupId(7), 5).as_slice() >= start.as_slice());
        assert!(log_key(GroupId(7), u64::MAX).as_slice() < end.as_slice());
        assert!(log_key(GroupId(8), 0).as_slice() >= end.as_slice());
    }

    #[test]
    fn app_range_contains_app_keys_only() {
        let (start, end) = app_range(GroupId(3));
        for key in [&b""[..], b"refs/heads/main", &[0xff; 40]] {
            let k = app_key(GroupId(3), key);
            assert!(start.as_slice() <= k.as_slice() && k.as_slice() < end.as_slice());
        }
        let internal = state_key(GroupId(3), StateKey::Applied);
        assert!(internal.as_slice() < start.as_slice());
        assert!(app_key(GroupId(4), b"").as_slice() >= end.as_slice());
        assert!(app_key(GroupId(2), &[0xff; 40]).as_slice() < start.as_slice());
    }
}
