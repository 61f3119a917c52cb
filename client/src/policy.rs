//! The pure part of following a leader: how a failed call is classified
//! from the node's typed refusal or the transport's report ([`Failure`]),
//! and which node to try next after how long ([`decide`], bounded by a
//! [`RetryPolicy`]); plus the pool of channels the loops call through.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cairn_proto::routing::Refusal;
use tonic::transport::{Channel, Endpoint};

/// How a storage node call failed, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The node is not the leader; `hint` is the leader's `host:port`.
    NotLeader { hint: Option<String> },
    /// The node does not hold the workspace's shard: the directory entry
    /// used is stale. `epoch` is the map epoch the node knows.
    WrongShard { epoch: Option<u64> },
    /// The node could not be reached (down, refused, connection lost).
    Unreachable,
    /// Anything else is the request's own answer: not for routing to fix.
    Other,
}

impl Failure {
    /// From the node's typed refusal (`cairn_proto::routing`), or the
    /// transport's own report of a connection that broke.
    pub fn classify(status: &tonic::Status) -> Failure {
        match Refusal::of(status) {
            Some(Refusal::NotLeader { hint }) => Failure::NotLeader { hint },
            Some(Refusal::WrongShard { epoch }) => Failure::WrongShard { epoch },
            // A node that may have applied the request says so; replaying
            // it elsewhere could apply it twice, so the client decides.
            Some(Refusal::OutcomeUnknown) => Failure::Other,
            None => match status.code() {
                tonic::Code::Unavailable => Failure::Unreachable,
                // A connection that broke mid-call (the node died) surfaces
                // as an `Unknown` transport error: a node problem, not an
                // answer.
                tonic::Code::Unknown if is_transport_error(status) => Failure::Unreachable,
                _ => Failure::Other,
            },
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Retry { node: String, backoff: Duration },
    GiveUp,
}

/// Bounds on leader search.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Passes over the configured nodes before giving up. Election timeouts
    /// are 0.75–1.5 s; enough rounds with short, capped backoffs span an
    /// election (and a slow one) so a request that arrives during it waits
    /// for the new leader instead of failing, and lands soon after it wins.
    pub rounds: u32,
    /// Pause before the second round; doubles each round up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            rounds: 16,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
        }
    }
}

impl RetryPolicy {
    pub fn max_attempts(&self, nodes: usize) -> u32 {
        self.rounds
            .saturating_mul(u32::try_from(nodes.max(1)).unwrap_or(u32::MAX))
    }
}

/// A leader hint as a URL, with the scheme of the node that gave it.
pub fn hint_url(from: &str, hint: &str) -> String {
    if hint.contains("://") {
        return hint.to_owned();
    }
    let scheme = if from.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{hint}")
}

/// The next node of `nodes` (the workspace's replicas) to try after
/// `attempts` failed attempts, the last one on `current` with `failure`.
///
/// A hint is followed at once (the leader is known). Without one, try the
/// next configured node round-robin (from the first when `current` came
/// from a hint); each new pass over the nodes waits a little longer so an
/// election can finish.
pub fn decide(
    policy: &RetryPolicy,
    nodes: &[String],
    current: &str,
    failure: &Failure,
    attempts: u32,
) -> Decision {
    if nodes.is_empty() || attempts >= policy.max_attempts(nodes.len()) {
        return Decision::GiveUp;
    }
    match failure {
        Failure::Other => Decision::GiveUp,
        // A node naming itself as leader while refusing is mid-transition:
        // treat as no hint rather than loop on it.
        Failure::NotLeader { hint: Some(h) } if hint_url(current, h) != current => {
            Decision::Retry {
                node: hint_url(current, h),
                backoff: Duration::ZERO,
            }
        }
        // A stale directory entry that resolving again did not change:
        // another replica may hold the shard (or learn it does) meanwhile.
        Failure::NotLeader { .. } | Failure::WrongShard { .. } | Failure::Unreachable => {
            let next = nodes
                .iter()
                .position(|n| n == current)
                .map_or(0, |i| (i + 1) % nodes.len());
            let n = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
            let backoff = if attempts.is_multiple_of(n) {
                let round = attempts / n;
                let factor = 1u32 << (round.saturating_sub(1)).min(16);
                policy
                    .base_backoff
                    .saturating_mul(factor)
                    .min(policy.max_backoff)
            } else {
                Duration::ZERO
            };
            Decision::Retry {
                node: nodes[next].clone(),
                backoff,
            }
        }
    }
}

/// One lazily connected channel per node URL, configured or hinted.
#[derive(Default)]
pub struct NodePool {
    channels: Mutex<HashMap<String, Channel>>,
}

impl NodePool {
    pub fn channel(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(url) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            // A dead host must not eat the failover budget.
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        map.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// Whether `status` is tonic's report of a broken connection rather than
/// an answer from the node.
pub(crate) fn is_transport_error(status: &tonic::Status) -> bool {
    mentions_any(
        status,
        &[
            "transport error",
            "connection reset",
            "broken pipe",
            "connection closed",
        ],
    )
}

/// Whether `status` reports a connection that was never established.
/// tonic maps its `ConnectError` to `Unavailable` with the cause's text and
/// drops the error itself, so the text is all there is to go on.
pub fn is_connect_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && mentions_any(
            status,
            &[
                "tcp connect error",
                "connection refused",
                "dns error",
                "connect timed out",
            ],
        )
}

/// Whether the status message contains any of `phrases` (lowercase).
fn mentions_any(status: &tonic::Status, phrases: &[&str]) -> bool {
    let m = status.message().to_ascii_lowercase();
    phrases.iter().any(|p| m.contains(p))
}
