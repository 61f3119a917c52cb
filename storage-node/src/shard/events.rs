//! The shard's event log: what changed, in the order it was applied, for
//! consumers to follow (pull requests, webhooks, pipelines, Jira links).
//!
//! Applying an entry that changes refs or repositories writes, in the same
//! batch, an event keyed by the entry's log index: the repository, each
//! ref's old → new, the actor, push options, the entry's time. A named
//! consumer's cursor (the last index it has processed) is replicated
//! state, moved by `events.ack` entries, so a consumer resumes on whichever
//! node it reaches after a failover with no gap: at-least-once, ordered per
//! shard.
//!
//! Retention: an event goes once every registered consumer has passed it
//! and it is older than the minimum age; at the size bound (events or
//! bytes) the oldest go anyway. The highest index removed (the floor) is
//! kept, so a reader asking for anything at or below it learns that it has
//! a gap, and from where, and can reconcile from the current state. Pruning
//! does a bounded amount of work per applied entry, so a slow consumer never
//! holds up a push.

use cairn_raft::{GroupState, StateView};
use serde::{Deserialize, Serialize};

use super::entry::{Entry, EntryKinds};
use super::rows::{self, Format};
use super::state::ApplyError;

/// Row keys of the event log, relative to the shard.
pub mod keys {
    pub const EVENTS: &[u8] = b"e/";

    pub fn event(index: u64) -> Vec<u8> {
        let mut k = EVENTS.to_vec();
        k.extend_from_slice(&index.to_be_bytes());
        k
    }

    pub fn index_of(key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(EVENTS)?;
        Some(u64::from_be_bytes(rest.try_into().ok()?))
    }

    /// Count and bytes of the events kept, and the floor.
    pub const STATS: &[u8] = b"e#";
    pub const RETENTION: &[u8] = b"e!";
    pub const CONSUMERS: &[u8] = b"e@";

    pub fn consumer(name: &str) -> Vec<u8> {
        let mut k = CONSUMERS.to_vec();
        k.extend_from_slice(name.as_bytes());
        k
    }
}

/// What an event says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Push,
    RepoCreated,
    RepoDeleted,
    /// Visibility, description or main branch changed.
    RepoUpdated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::RepoCreated => "repo:created",
            EventKind::RepoDeleted => "repo:deleted",
            EventKind::RepoUpdated => "repo:updated",
        }
    }
}

/// One ref's move; ids are lower-case hex, all zeros for "none".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefChange {
    pub name: String,
    pub old: String,
    pub new: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The applied entry's log index: the event's position in the shard.
    pub index: u64,
    /// The entry's time (the proposing leader's clock), ms since the epoch.
    pub at_ms: i64,
    pub kind: EventKind,
    pub repo_id: u64,
    /// `workspace/slug`.
    pub repository: String,
    pub changes: Vec<RefChange>,
    pub actor: Option<String>,
    pub push_options: Vec<String>,
}

/// How long events stay, and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// An event passed by every consumer still stays this long.
    pub min_age_ms: i64,
    /// Beyond either bound the oldest events go, passed or not.
    pub max_events: u64,
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            min_age_ms: 24 * 3600 * 1000,
            max_events: 1_000_000,
            max_bytes: 512 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stats {
    count: u64,
    bytes: u64,
    /// Highest index removed; events at or below it are gone.
    floor: u64,
}

/// A consumer's place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// The last index it has processed.
    pub position: u64,
}

/// Consumers a shard keeps at most: each holds events back and is read by
/// every prune.
pub const MAX_CONSUMERS: usize = 64;

/// What the applying entry changed that [`prune`] must see.
#[derive(Clone, Copy)]
enum Changed<'a> {
    Nothing,
    Retention(Retention),
    /// A consumer's cursor, new or moved.
    Cursor(&'a str, u64),
}

/// Events removed per applied entry at most: bounded work, still faster
/// than entries add them.
const PRUNE_BATCH: usize = 64;

fn get<T: for<'de> Deserialize<'de>>(
    state: &GroupState<'_>,
    key: &[u8],
) -> Result<Option<T>, ApplyError> {
    state
        .get(key)?
        .map(|v| rows::read_json(key, &v).map_err(ApplyError::from))
        .transpose()
}

/// Writes `event` (at the applied entry's index) and lets retention catch
/// up. `now_ms` is the entry's time, so every replica prunes alike.
pub fn record(state: &mut GroupState<'_>, event: &Event) -> Result<(), ApplyError> {
    let row = rows::json(Format::V1, event);
    let mut stats: Stats = get(state, keys::STATS)?.unwrap_or_default();
    stats.count += 1;
    stats.bytes += row.len() as u64;
    state.put(&keys::event(event.index), &row);
    prune(state, stats, event.at_ms, Changed::Nothing)
}

fn consumers(state: &GroupState<'_>) -> Result<Vec<(String, Consumer)>, ApplyError> {
    state
        .scan_prefix(keys::CONSUMERS)?
        .into_iter()
        .map(|(k, v)| {
            let name = String::from_utf8_lossy(&k[keys::CONSUMERS.len()..]).into_owned();
            Ok((name, rows::read_json(&k, &v)?))
        })
        .collect()
}

/// Removes the oldest events that may go (see the module doc), at most
/// [`PRUNE_BATCH`], and writes the stats back.
///
/// Reads see the state as of before the entry, so an entry that changes
/// the retention or a cursor passes the new one in `changed`.
fn prune(
    state: &mut GroupState<'_>,
    mut stats: Stats,
    now_ms: i64,
    changed: Changed<'_>,
) -> Result<(), ApplyError> {
    let retention = match changed {
        Changed::Retention(r) => r,
        _ => get(state, keys::RETENTION)?.unwrap_or_default(),
    };
    let slowest = consumers(state)?
        .into_iter()
        .map(|(name, c)| match changed {
            Changed::Cursor(changed, position) if changed == name => position,
            _ => c.position,
        })
        .chain(match changed {
            Changed::Cursor(_, position) => Some(position),
            _ => None,
        })
        .min()
        .unwrap_or(u64::MAX);
    // One row at a time: the common case, nothing to remove, reads one.
    let mut after: Option<Vec<u8>> = None;
    for _ in 0..PRUNE_BATCH {
        let Some((key, row)) = state
            .scan_prefix_page(keys::EVENTS, after.as_deref(), 1)?
            .into_iter()
            .next()
        else {
            break;
        };
        let Some(index) = keys::index_of(&key) else {
            break;
        };
        let event: Event = rows::read_json(&key, &row)?;
        let passed = slowest >= index && now_ms.saturating_sub(event.at_ms) >= retention.min_age_ms;
        let over = stats.count > retention.max_events || stats.bytes > retention.max_bytes;
        if !passed && !over {
            break;
        }
        state.delete(&key);
        stats.count = stats.count.saturating_sub(1);
        stats.bytes = stats.bytes.saturating_sub(row.len() as u64);
        stats.floor = stats.floor.max(index);
        after = Some(key);
    }
    state.put(keys::STATS, &rows::json(Format::V1, &stats));
    Ok(())
}

/// What a reader gets: events after its position, and whether some it
/// had not seen are gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    pub events: Vec<Event>,
    /// `(from, to)`: indexes after the reader's position that retention
    /// removed before it read them.
    pub gap: Option<(u64, u64)>,
}

/// Up to `limit` events after `after`, from one replica's state.
pub fn read(view: &StateView, after: u64, limit: usize) -> Result<Read, ApplyError> {
    let stats: Stats = view
        .get(keys::STATS)?
        .map(|v| rows::read_json(keys::STATS, &v))
        .transpose()?
        .unwrap_or_default();
    let gap = (after < stats.floor).then_some((after + 1, stats.floor));
    let start = after.max(stats.floor);
    let rows = view.scan_prefix_page(keys::EVENTS, Some(&keys::event(start)), limit)?;
    let events = rows
        .iter()
        .map(|(k, v)| rows::read_json(k, v).map_err(ApplyError::from))
        .collect::<Result<Vec<Event>, _>>()?;
    Ok(Read { events, gap })
}

/// A consumer's cursor, if it is registered.
pub fn consumer(view: &StateView, name: &str) -> Result<Option<Consumer>, ApplyError> {
    let key = keys::consumer(name);
    Ok(view
        .get(&key)?
        .map(|v| rows::read_json(&key, &v))
        .transpose()?)
}

/// Consumer names: what is safe as a key and in a log line.
pub fn valid_consumer(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The kinds of the event log's own entries.
pub mod kinds {
    pub const REGISTER: &str = "events.register";
    pub const ACK: &str = "events.ack";
    pub const UNREGISTER: &str = "events.unregister";
    pub const RETENTION: &str = "events.retention";
}

/// `events.register`: a consumer starts at `from`, else at the applied
/// index (it has passed everything before it registered). Registering an
/// existing consumer keeps its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub consumer: String,
    pub from: Option<u64>,
}

/// `events.ack`: the consumer has processed everything up to `position`.
/// Cursors only move forward; an unknown consumer is registered there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub consumer: String,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unregister {
    pub consumer: String,
}

/// What the event log's entries answer: the consumer's cursor after the
/// entry (absent for `events.unregister` and `events.retention`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Consumer(Option<Consumer>),
    Refused(String),
}

/// The event log's entry kinds, registered with every shard.
pub struct EventKinds;

impl EventKinds {
    fn set_cursor(
        state: &mut GroupState<'_>,
        is_new: bool,
        name: &str,
        position: u64,
        now_ms: i64,
    ) -> Result<Answer, ApplyError> {
        if !valid_consumer(name) {
            return Ok(Answer::Refused(format!("invalid consumer name {name:?}")));
        }
        if is_new && consumers(state)?.len() >= MAX_CONSUMERS {
            return Ok(Answer::Refused(format!(
                "a shard keeps at most {MAX_CONSUMERS} consumers; unregister one first"
            )));
        }
        // Nobody passes what has not happened yet.
        let position = position.min(state.log_id().index());
        let consumer = Consumer { position };
        state.put(&keys::consumer(name), &rows::json(Format::V1, &consumer));
        let stats: Stats = get(state, keys::STATS)?.unwrap_or_default();
        prune(state, stats, now_ms, Changed::Cursor(name, position))?;
        Ok(Answer::Consumer(Some(consumer)))
    }
}

impl EntryKinds for EventKinds {
    fn kinds(&self) -> &'static [(&'static str, u16)] {
        &[
            (kinds::REGISTER, 1),
            (kinds::ACK, 1),
            (kinds::UNREGISTER, 1),
            (kinds::RETENTION, 1),
        ]
    }

    fn row_prefixes(&self) -> &'static [&'static [u8]] {
        &[keys::EVENTS, keys::STATS, keys::RETENTION, keys::CONSUMERS]
    }

    fn apply(&self, state: &mut GroupState<'_>, entry: &Entry) -> Result<Vec<u8>, ApplyError> {
        let answer = match entry.kind.as_str() {
            kinds::REGISTER => {
                let r: Register = entry.decode()?;
                match get::<Consumer>(state, &keys::consumer(&r.consumer))? {
                    Some(existing) => Answer::Consumer(Some(existing)),
                    None => {
                        let from = r.from.unwrap_or_else(|| state.log_id().index());
                        Self::set_cursor(state, true, &r.consumer, from, entry.at_ms)?
                    }
                }
            }
            kinds::ACK => {
                let a: Ack = entry.decode()?;
                let now = get::<Consumer>(state, &keys::consumer(&a.consumer))?;
                match now {
                    Some(c) if c.position >= a.position => {
                        // Not moved, but time passed: retention may act.
                        let stats: Stats = get(state, keys::STATS)?.unwrap_or_default();
                        prune(state, stats, entry.at_ms, Changed::Nothing)?;
                        Answer::Consumer(Some(c))
                    }
                    now => Self::set_cursor(
                        state,
                        now.is_none(),
                        &a.consumer,
                        a.position,
                        entry.at_ms,
                    )?,
                }
            }
            kinds::UNREGISTER => {
                let u: Unregister = entry.decode()?;
                state.delete(&keys::consumer(&u.consumer));
                Answer::Consumer(None)
            }
            kinds::RETENTION => {
                let r: Retention = entry.decode()?;
                if r.min_age_ms < 0 || r.max_events == 0 || r.max_bytes == 0 {
                    Answer::Refused("retention bounds must be positive".into())
                } else {
                    state.put(keys::RETENTION, &rows::json(Format::V1, &r));
                    let stats: Stats = get(state, keys::STATS)?.unwrap_or_default();
                    prune(state, stats, entry.at_ms, Changed::Retention(r))?;
                    Answer::Consumer(None)
                }
            }
            other => {
                return Err(ApplyError::UnknownEntry {
                    kind: other.to_owned(),
                    version: entry.version,
                    newest: None,
                })
            }
        };
        Ok(postcard::to_allocvec(&answer).expect("answers always encode"))
    }
}
