//! A switchable fault injector for raft traffic (in the spirit of tikv's
//! `transport_simulate`): cluster tests cut nodes off from each other
//! without touching sockets, and heal them again.
//!
//! The filter is consulted by the sending side before every RPC. Because
//! every node-to-node message (requests and, implicitly, their answers) is
//! sent by some node's client, checking the `(from, to)` pair there is
//! enough to cut traffic in both directions. Off by default: an empty
//! filter allows everything and costs one uncontended read lock per RPC.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::types::NodeId;

/// Which node pairs may talk. Cloning shares the rules: tests hand one
/// filter to every node and change it while the cluster runs.
#[derive(Debug, Clone, Default)]
pub struct TransportFilter {
    rules: Arc<RwLock<Rules>>,
}

/// The current rules; a pure value so the decision is unit-testable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Nodes whose traffic (to and from them) is dropped.
    pub blocked: BTreeSet<NodeId>,
    /// When set, only nodes in the same set may talk; a node in no set is
    /// cut off from everyone.
    pub partition: Option<Vec<BTreeSet<NodeId>>>,
}

impl Rules {
    /// Whether a message from `from` to `to` gets through.
    pub fn allows(&self, from: NodeId, to: NodeId) -> bool {
        if self.blocked.contains(&from) || self.blocked.contains(&to) {
            return false;
        }
        match &self.partition {
            None => true,
            Some(sets) => sets.iter().any(|s| s.contains(&from) && s.contains(&to)),
        }
    }
}

impl TransportFilter {
    /// A filter that lets everything through.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, f: impl FnOnce(&mut Rules)) {
        // A panic while holding the lock cannot leave the rules half
        // updated in a way that matters to a test, so poison is ignored.
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        f(&mut rules);
    }

    /// Drops all traffic to and from each of `nodes`, in addition to the
    /// rules already in force.
    pub fn block_nodes(&self, nodes: impl IntoIterator<Item = NodeId>) {
        self.update(|r| r.blocked.extend(nodes));
    }

    /// Cuts `node` off from every other node.
    pub fn isolate(&self, node: NodeId) {
        self.block_nodes([node]);
    }

    /// Lets traffic of `node` through again (undoes `block_nodes`/`isolate`
    /// for that node; a partition stays in force).
    pub fn unblock(&self, node: NodeId) {
        self.update(|r| {
            r.blocked.remove(&node);
        });
    }

    /// Splits the cluster: nodes talk only within their own set. Replaces
    /// an earlier partition.
    pub fn partition<S>(&self, sets: impl IntoIterator<Item = S>)
    where
        S: IntoIterator<Item = NodeId>,
    {
        let sets = sets.into_iter().map(|s| s.into_iter().collect()).collect();
        self.update(|r| r.partition = Some(sets));
    }

    /// Removes every rule: all traffic flows again.
    pub fn heal(&self) {
        self.update(|r| *r = Rules::default());
    }

    /// A copy of the rules in force.
    pub fn rules(&self) -> Rules {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a message from `from` to `to` gets through right now.
    pub fn allows(&self, from: NodeId, to: NodeId) -> bool {
        self.rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_the_rules() {
        let all_pairs = |f: &TransportFilter| {
            let mut allowed = Vec::new();
            for from in 1..=3 {
                for to in 1..=3 {
                    if from != to && f.allows(from, to) {
                        allowed.push((from, to));
                    }
                }
            }
            allowed
        };
        let f = TransportFilter::new();
        assert_eq!(all_pairs(&f).len(), 6, "an empty filter allows everything");

        f.isolate(1);
        assert_eq!(all_pairs(&f), vec![(2, 3), (3, 2)]);
        f.unblock(1);
        assert_eq!(all_pairs(&f).len(), 6);

        f.partition([vec![1, 2], vec![3]]);
        assert_eq!(all_pairs(&f), vec![(1, 2), (2, 1)]);
        f.partition([vec![1, 3]]);
        assert_eq!(all_pairs(&f), vec![(1, 3), (3, 1)], "node 2 is in no set");

        let shared = f.clone();
        shared.heal();
        assert_eq!(f.rules(), Rules::default(), "clones share the rules");
        assert_eq!(all_pairs(&f).len(), 6);
    }
}
