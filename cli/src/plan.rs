//! Shard rebalance planner: works out the replica moves and leader transfers
//! that even out replicas, leaders and bytes across the active storage nodes.
//!
//! [`plan`] is a pure function (no I/O, no clock, no randomness, no hash-map
//! iteration order), so `cairn shard rebalance --dry-run` prints exactly the
//! steps a real run would execute for the same cluster view.
//!
//! The planner simulates every step on its own copy of the layout, so later
//! steps see the effect of earlier ones. It works in three phases:
//!
//! 1. **Evacuate.** Shards in id order; within a shard, replicas on a
//!    Draining, Removed or unknown node in node-id order. Each moves to the
//!    active node that does not hold the shard yet with the fewest replicas,
//!    then the fewest bytes, then the lowest id. A replica with no such node
//!    stays where it is.
//! 2. **Even out replica counts** over active nodes. While the most and least
//!    loaded active nodes differ by more than one replica, move one replica
//!    from the most loaded (most replicas, then most bytes, then lowest id) to
//!    the least loaded (fewest replicas, then fewest bytes, then lowest id).
//!    The shard moved is the one, among those on the source and not on the
//!    target, that leaves the byte difference between the two nodes smallest
//!    in absolute value (ties: smaller shard, then lower shard id). Such a
//!    shard always exists: the source holds more shards than the target.
//! 3. **Even out leaders.** A shard's leader counts only if it is one of the
//!    shard's replicas; `leader: None` is ignored. A [`Step::Move`] carries
//!    leadership with it when `from` led the shard. First, a leader left on a
//!    non-active node (its replica could not move) goes to the shard's active
//!    replica leading the fewest shards (then lowest id). Then, repeatedly:
//!    take active nodes by most leaders (then lowest id) and, for the first
//!    one that can, transfer one of its shards to another active replica that
//!    leads at least two fewer shards, choosing the target leading the fewest
//!    (then lowest node id, then lowest shard id). Every transfer lowers the
//!    sum of squared leader counts, so this stops; it stops when no such
//!    transfer exists.
//!
//! Loops are capped at four times the total replica count as a safety net.
//! Nothing to do yields an empty plan, and planning the resulting layout
//! again yields an empty plan too.
//!
//! The meta group (the directory, [`META_SHARD`]) is planned apart by
//! [`plan_meta`]: it carries no data and little load, so its replicas only
//! move off nodes that are not active, never for balance.

use std::collections::BTreeMap;
use std::fmt;

/// Membership state of a storage node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// Takes new replicas and leaders.
    Active,
    /// Being emptied: all its replicas move away.
    Draining,
    /// Gone: any replica still listed on it moves away.
    Removed,
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub state: NodeState,
}

/// One shard's Raft group: the nodes holding a replica, the current leader
/// (if known) and the shard's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    pub id: u64,
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
    pub bytes: u64,
}

/// The shard id of the meta group in steps and views.
pub const META_SHARD: u64 = 0;

/// One step of a rebalance plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Move `shard`'s replica from node `from` to node `to`. The mover hands
    /// leadership to `to` if `from` led the shard.
    Move { shard: u64, from: u64, to: u64 },
    /// Transfer leadership of `shard` from node `from` to node `to`, which
    /// already holds a replica.
    TransferLeader { shard: u64, from: u64, to: u64 },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Move {
                shard: META_SHARD,
                from,
                to,
            } => write!(f, "move the meta group: node {from} -> node {to}"),
            Step::Move { shard, from, to } => {
                write!(f, "move shard {shard}: node {from} -> node {to}")
            }
            Step::TransferLeader {
                shard: META_SHARD,
                from,
                to,
            } => write!(f, "leader of the meta group: node {from} -> node {to}"),
            Step::TransferLeader { shard, from, to } => {
                write!(f, "leader of shard {shard}: node {from} -> node {to}")
            }
        }
    }
}

/// Plans the steps that evacuate non-active nodes and even out replicas,
/// bytes and leaders across active nodes. See the module docs for the rules.
pub fn plan(nodes: &[NodeView], shards: &[ShardView]) -> Vec<Step> {
    let mut sim = Sim::new(nodes, shards);
    sim.evacuate();
    sim.balance_replicas();
    sim.rescue_leaders();
    sim.balance_leaders();
    sim.steps
}

/// Plans the meta group's steps: each of its replicas on a node that is
/// not active (in node-id order) moves to the active node without one that
/// holds the fewest data replicas (then fewest bytes, then lowest id),
/// carrying leadership along; a leader left on a non-active node (its
/// replica had nowhere to go) is handed to the active replica with the
/// lowest id. `shards` (data shards) only weigh the choice of target.
pub fn plan_meta(nodes: &[NodeView], meta: &ShardView, shards: &[ShardView]) -> Vec<Step> {
    let load: BTreeMap<u64, (usize, u64)> = summarize(nodes, shards)
        .into_iter()
        .map(|(id, replicas, _, bytes)| (id, (replicas, bytes)))
        .collect();
    let mut states: BTreeMap<u64, &NodeState> = BTreeMap::new();
    for node in nodes {
        states.entry(node.id).or_insert(&node.state);
    }
    let is_active = |id: u64| states.get(&id).is_some_and(|s| **s == NodeState::Active);
    let mut replicas = meta.replicas.clone();
    let mut leader = meta.leader.filter(|l| replicas.contains(l));
    let mut stranded: Vec<u64> = replicas
        .iter()
        .copied()
        .filter(|&r| !is_active(r))
        .collect();
    stranded.sort_unstable();
    stranded.dedup();
    let mut steps = Vec::new();
    for from in stranded {
        let target = states
            .keys()
            .copied()
            .filter(|&n| is_active(n) && !replicas.contains(&n))
            .min_by_key(|&n| {
                let (r, b) = load.get(&n).copied().unwrap_or_default();
                (r, b, n)
            });
        let Some(to) = target else { break };
        for slot in replicas.iter_mut().filter(|r| **r == from) {
            *slot = to;
        }
        if leader == Some(from) {
            leader = Some(to);
        }
        steps.push(Step::Move {
            shard: META_SHARD,
            from,
            to,
        });
    }
    if let Some(from) = leader.filter(|&l| !is_active(l)) {
        let to = replicas.iter().copied().filter(|&r| is_active(r)).min();
        if let Some(to) = to {
            steps.push(Step::TransferLeader {
                shard: META_SHARD,
                from,
                to,
            });
        }
    }
    steps
}

/// Per node `(id, replicas, leaders, bytes)`, sorted by id, over every node
/// in `nodes` (each id once). `bytes` is the sum of the sizes of the shards
/// the node holds (saturating).
pub fn summarize(nodes: &[NodeView], shards: &[ShardView]) -> Vec<(u64, usize, usize, u64)> {
    let mut ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let (mut replicas, mut leaders, mut bytes) = (0usize, 0usize, 0u64);
            for shard in shards {
                let held = shard.replicas.iter().filter(|&&r| r == id).count();
                if held > 0 {
                    replicas += held;
                    bytes = bytes.saturating_add(shard.bytes);
                }
                if shard.leader == Some(id) {
                    leaders += 1;
                }
            }
            (id, replicas, leaders, bytes)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Default)]
struct Load {
    replicas: usize,
    leaders: usize,
    /// u128 so sums of u64 sizes cannot overflow.
    bytes: u128,
}

/// The planner's private copy of the layout plus the steps so far.
struct Sim {
    /// Active node ids, ascending.
    active: Vec<u64>,
    /// Shards sorted by id.
    shards: Vec<ShardView>,
    /// Load of every node id seen (in `nodes`, replicas or leaders).
    load: BTreeMap<u64, Load>,
    /// Safety cap on loop iterations per phase.
    cap: usize,
    steps: Vec<Step>,
}

impl Sim {
    fn new(nodes: &[NodeView], shards: &[ShardView]) -> Self {
        // The first entry for an id wins if `nodes` lists it twice.
        let mut states: BTreeMap<u64, &NodeState> = BTreeMap::new();
        for node in nodes {
            states.entry(node.id).or_insert(&node.state);
        }
        let active: Vec<u64> = states
            .iter()
            .filter(|(_, s)| ***s == NodeState::Active)
            .map(|(&id, _)| id)
            .collect();
        let mut shards = shards.to_vec();
        shards.sort_by_key(|s| s.id);
        let mut load: BTreeMap<u64, Load> =
            states.keys().map(|&id| (id, Load::default())).collect();
        let mut total_replicas = 0usize;
        for shard in &shards {
            for &r in &shard.replicas {
                let l = load.entry(r).or_default();
                l.replicas += 1;
                l.bytes += u128::from(shard.bytes);
                total_replicas += 1;
            }
            if let Some(leader) = counted_leader(shard) {
                load.entry(leader).or_default().leaders += 1;
            }
        }
        Sim {
            active,
            shards,
            load,
            cap: total_replicas.saturating_mul(4),
            steps: Vec::new(),
        }
    }

    fn is_active(&self, id: u64) -> bool {
        self.active.binary_search(&id).is_ok()
    }

    fn load(&self, id: u64) -> Load {
        self.load.get(&id).copied().unwrap_or_default()
    }

    /// Moves shard `idx`'s replica `from` -> `to`, carrying leadership along.
    fn do_move(&mut self, idx: usize, from: u64, to: u64) {
        let shard = &mut self.shards[idx];
        if let Some(slot) = shard.replicas.iter_mut().find(|r| **r == from) {
            *slot = to;
        }
        let size = u128::from(shard.bytes);
        let carries_leader = shard.leader == Some(from);
        if carries_leader {
            shard.leader = Some(to);
        }
        let id = shard.id;
        let src = self.load.entry(from).or_default();
        src.replicas -= 1;
        src.bytes -= size;
        if carries_leader {
            src.leaders -= 1;
        }
        let dst = self.load.entry(to).or_default();
        dst.replicas += 1;
        dst.bytes += size;
        if carries_leader {
            dst.leaders += 1;
        }
        self.steps.push(Step::Move {
            shard: id,
            from,
            to,
        });
    }

    fn do_transfer(&mut self, idx: usize, from: u64, to: u64) {
        let shard = &mut self.shards[idx];
        shard.leader = Some(to);
        let id = shard.id;
        self.load.entry(from).or_default().leaders -= 1;
        self.load.entry(to).or_default().leaders += 1;
        self.steps.push(Step::TransferLeader {
            shard: id,
            from,
            to,
        });
    }

    /// Phase 1: move every replica off non-active nodes where possible.
    fn evacuate(&mut self) {
        for idx in 0..self.shards.len() {
            let mut stranded: Vec<u64> = self.shards[idx]
                .replicas
                .iter()
                .copied()
                .filter(|&r| !self.is_active(r))
                .collect();
            stranded.sort_unstable();
            stranded.dedup();
            for from in stranded {
                let replicas = &self.shards[idx].replicas;
                let target = self
                    .active
                    .iter()
                    .copied()
                    .filter(|n| !replicas.contains(n))
                    .min_by_key(|&n| {
                        let l = self.load(n);
                        (l.replicas, l.bytes, n)
                    });
                match target {
                    Some(to) => self.do_move(idx, from, to),
                    // No active node lacks this shard: later replicas of it
                    // cannot move either.
                    None => break,
                }
            }
        }
    }

    /// Phase 2: even out replica counts across active nodes, byte-aware.
    fn balance_replicas(&mut self) {
        for _ in 0..self.cap {
            let Some(src) = self.active.iter().copied().max_by_key(|&n| {
                let l = self.load(n);
                (l.replicas, l.bytes, std::cmp::Reverse(n))
            }) else {
                return;
            };
            let Some(dst) = self.active.iter().copied().min_by_key(|&n| {
                let l = self.load(n);
                (l.replicas, l.bytes, n)
            }) else {
                return;
            };
            let (s, d) = (self.load(src), self.load(dst));
            if s.replicas <= d.replicas + 1 {
                return;
            }
            // Byte difference after moving a shard of size b: diff - 2b.
            let diff = s.bytes as i128 - d.bytes as i128;
            let choice = self
                .shards
                .iter()
                .enumerate()
                .filter(|(_, sh)| sh.replicas.contains(&src) && !sh.replicas.contains(&dst))
                .min_by_key(|(_, sh)| {
                    let b = i128::from(sh.bytes);
                    ((diff - 2 * b).unsigned_abs(), sh.bytes, sh.id)
                })
                .map(|(idx, _)| idx);
            match choice {
                Some(idx) => self.do_move(idx, src, dst),
                // Unreachable for well-formed input (distinct replicas).
                None => return,
            }
        }
    }

    /// Phase 3a: a leader stuck on a non-active node goes to an active replica.
    fn rescue_leaders(&mut self) {
        for idx in 0..self.shards.len() {
            let Some(leader) = counted_leader(&self.shards[idx]) else {
                continue;
            };
            if self.is_active(leader) {
                continue;
            }
            let target = self.shards[idx]
                .replicas
                .iter()
                .copied()
                .filter(|&r| self.is_active(r))
                .min_by_key(|&r| (self.load(r).leaders, r));
            if let Some(to) = target {
                self.do_transfer(idx, leader, to);
            }
        }
    }

    /// Phase 3b: even out leader counts across active nodes.
    fn balance_leaders(&mut self) {
        for _ in 0..self.cap {
            let mut sources = self.active.clone();
            sources.sort_by_key(|&n| (std::cmp::Reverse(self.load(n).leaders), n));
            let found = sources.iter().find_map(|&src| self.best_transfer_from(src));
            match found {
                Some((idx, from, to)) => self.do_transfer(idx, from, to),
                None => return,
            }
        }
    }

    /// The best leader transfer away from `src`, if any target leads at least
    /// two fewer shards: `(shard index, from, to)`.
    fn best_transfer_from(&self, src: u64) -> Option<(usize, u64, u64)> {
        let src_leaders = self.load(src).leaders;
        let mut best: Option<((usize, u64, u64), usize)> = None;
        for (idx, shard) in self.shards.iter().enumerate() {
            if counted_leader(shard) != Some(src) {
                continue;
            }
            for &to in &shard.replicas {
                if to == src || !self.is_active(to) {
                    continue;
                }
                let to_leaders = self.load(to).leaders;
                if to_leaders + 2 > src_leaders {
                    continue;
                }
                // Shards are scanned in id order, so strict `<` keeps the
                // lowest shard id among equal (leaders, node id) keys.
                let key = (to_leaders, to, shard.id);
                if best.is_none_or(|(k, _)| key < k) {
                    best = Some((key, idx));
                }
            }
        }
        best.map(|((_, to, _), idx)| (idx, src, to))
    }
}

/// The shard's leader if known and one of its replicas; otherwise `None`.
fn counted_leader(shard: &ShardView) -> Option<u64> {
    shard.leader.filter(|l| shard.replicas.contains(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, state: NodeState) -> NodeView {
        NodeView { id, state }
    }

    fn active(ids: &[u64]) -> Vec<NodeView> {
        ids.iter().map(|&id| node(id, NodeState::Active)).collect()
    }

    fn shard(id: u64, replicas: &[u64], leader: Option<u64>, bytes: u64) -> ShardView {
        ShardView {
            id,
            replicas: replicas.to_vec(),
            leader,
            bytes,
        }
    }

    fn mv(shard: u64, from: u64, to: u64) -> Step {
        Step::Move { shard, from, to }
    }

    fn tl(shard: u64, from: u64, to: u64) -> Step {
        Step::TransferLeader { shard, from, to }
    }

    fn is_active(nodes: &[NodeView], id: u64) -> bool {
        nodes
            .iter()
            .any(|n| n.id == id && n.state == NodeState::Active)
    }

    /// Applies `steps` to a copy of `shards`, asserting each step is valid.
    fn apply(nodes: &[NodeView], shards: &[ShardView], steps: &[Step]) -> Vec<ShardView> {
        let mut out = shards.to_vec();
        for step in steps {
            match *step {
                Step::Move { shard, from, to } => {
                    let s = out.iter_mut().find(|s| s.id == shard).expect("shard");
                    assert!(s.replicas.contains(&from), "{step}: source lacks shard");
                    assert!(!s.replicas.contains(&to), "{step}: target holds shard");
                    assert!(is_active(nodes, to), "{step}: target not active");
                    let slot = s.replicas.iter_mut().find(|r| **r == from).expect("slot");
                    *slot = to;
                    if s.leader == Some(from) {
                        s.leader = Some(to);
                    }
                }
                Step::TransferLeader { shard, from, to } => {
                    let s = out.iter_mut().find(|s| s.id == shard).expect("shard");
                    assert_eq!(s.leader, Some(from), "{step}: not the leader");
                    assert!(s.replicas.contains(&to), "{step}: target has no replica");
                    assert!(is_active(nodes, to), "{step}: target not active");
                    s.leader = Some(to);
                }
            }
        }
        out
    }

    /// Plans, applies and checks the invariants; returns plan and result.
    fn check(name: &str, nodes: &[NodeView], shards: &[ShardView]) -> (Vec<Step>, Vec<ShardView>) {
        let steps = plan(nodes, shards);
        let after = apply(nodes, shards, &steps);
        let actives: Vec<u64> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| n.id)
            .collect();
        for (b, a) in shards.iter().zip(&after) {
            assert_eq!(b.replicas.len(), a.replicas.len(), "{name}: shard {}", a.id);
            let mut r = a.replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), a.replicas.len(), "{name}: duplicate in {a:?}");
            let room = actives.iter().any(|n| !a.replicas.contains(n));
            if room {
                assert!(
                    a.replicas.iter().all(|&r| is_active(nodes, r)),
                    "{name}: shard {} left on an inactive node: {:?}",
                    a.id,
                    a.replicas
                );
            }
        }
        let counts: Vec<usize> = summarize(nodes, &after)
            .iter()
            .filter(|(id, ..)| actives.contains(id))
            .map(|&(_, replicas, ..)| replicas)
            .collect();
        if let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) {
            assert!(max - min <= 1, "{name}: replica counts {counts:?}");
        }
        assert_eq!(plan(nodes, &after), vec![], "{name}: re-plan not empty");
        assert_eq!(plan(nodes, shards), steps, "{name}: not deterministic");
        (steps, after)
    }

    fn leader_spread(nodes: &[NodeView], shards: &[ShardView]) -> usize {
        let leaders: Vec<usize> = summarize(nodes, shards)
            .iter()
            .filter(|(id, ..)| is_active(nodes, *id))
            .map(|&(_, _, leaders, _)| leaders)
            .collect();
        leaders.iter().max().unwrap_or(&0) - leaders.iter().min().unwrap_or(&0)
    }

    /// 3 nodes, 4 shards × 3 replicas, leaders spread; sizes 100..400.
    fn balanced_three() -> Vec<ShardView> {
        vec![
            shard(1, &[1, 2, 3], Some(1), 100),
            shard(2, &[1, 2, 3], Some(2), 200),
            shard(3, &[1, 2, 3], Some(3), 300),
            shard(4, &[1, 2, 3], Some(1), 400),
        ]
    }

    #[test]
    fn table_of_cases() {
        struct Case {
            name: &'static str,
            nodes: Vec<NodeView>,
            shards: Vec<ShardView>,
            /// Exact expected plan, where practical.
            expect: Option<Vec<Step>>,
        }
        let cases = vec![
            Case {
                name: "nothing to do",
                nodes: active(&[1, 2, 3]),
                shards: balanced_three(),
                expect: Some(vec![]),
            },
            Case {
                name: "empty cluster",
                nodes: vec![],
                shards: vec![],
                expect: Some(vec![]),
            },
            Case {
                // Node 1 (lowest id among equals) gives shard 4: 400 bytes
                // best halves the 1000-byte gap. Then node 2 gives shard 3
                // (600 gap), then node 3 gives shard 1 (300 gap: 100 and 200
                // tie on distance, the smaller wins).
                name: "node added empty",
                nodes: active(&[1, 2, 3, 4]),
                shards: balanced_three(),
                expect: Some(vec![mv(4, 1, 4), mv(3, 2, 4), mv(1, 3, 4)]),
            },
            Case {
                // Each of node 2's shards has exactly one valid target; the
                // leader of shard 2 follows its replica to node 1.
                name: "draining node",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Draining),
                    node(3, NodeState::Active),
                    node(4, NodeState::Active),
                ],
                shards: vec![
                    shard(1, &[1, 2, 3], Some(1), 10),
                    shard(2, &[2, 3, 4], Some(2), 20),
                    shard(3, &[1, 2, 4], Some(4), 30),
                    shard(4, &[1, 3, 4], Some(3), 40),
                ],
                expect: Some(vec![mv(1, 2, 4), mv(2, 2, 1), mv(3, 2, 3)]),
            },
            Case {
                // Node 4 is removed but still listed; node 9 is unknown.
                name: "removed and unknown nodes",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Active),
                    node(3, NodeState::Active),
                    node(4, NodeState::Removed),
                ],
                shards: vec![
                    shard(1, &[1, 2, 4], Some(4), 10),
                    shard(2, &[1, 2, 3], Some(1), 10),
                    shard(3, &[2, 3, 9], Some(2), 10),
                ],
                expect: Some(vec![mv(1, 4, 3), mv(3, 9, 1)]),
            },
            Case {
                // Counts 5,5,5,3: one move from node 1 (most bytes) to node 4.
                // Gap 600: shard 2 (400) leaves -200, beating shard 1 (100,
                // leaves 400) and shard 3 (1000, leaves -1400).
                name: "bytes decide the shard",
                nodes: active(&[1, 2, 3, 4]),
                shards: vec![
                    shard(1, &[1, 2, 3], None, 100),
                    shard(2, &[1, 2, 3], None, 400),
                    shard(3, &[1, 2, 3], None, 1000),
                    shard(4, &[2, 3, 4], None, 900),
                    shard(5, &[1, 3, 4], None, 1000),
                    shard(6, &[1, 2, 4], None, 1000),
                ],
                expect: Some(vec![mv(2, 1, 4)]),
            },
            Case {
                // Node 1 holds all six shards; 18 replicas over 5 nodes.
                name: "one heavy node",
                nodes: active(&[1, 2, 3, 4, 5]),
                shards: vec![
                    shard(1, &[1, 2, 3], Some(1), 100),
                    shard(2, &[1, 2, 3], Some(1), 200),
                    shard(3, &[1, 2, 3], Some(1), 300),
                    shard(4, &[1, 4, 5], Some(1), 400),
                    shard(5, &[1, 2, 4], Some(1), 500),
                    shard(6, &[1, 3, 5], Some(1), 600),
                ],
                expect: None,
            },
            Case {
                // 3 nodes × 6 shards, node 1 leads all.
                name: "leaders on one node",
                nodes: active(&[1, 2, 3]),
                shards: (1..=6).map(|i| shard(i, &[1, 2, 3], Some(1), 10)).collect(),
                expect: Some(vec![tl(1, 1, 2), tl(2, 1, 3), tl(3, 1, 2), tl(4, 1, 3)]),
            },
            Case {
                // Replicas cannot leave node 3, but its leadership can.
                name: "not enough active nodes",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Active),
                    node(3, NodeState::Draining),
                ],
                shards: vec![
                    shard(1, &[1, 2, 3], Some(3), 10),
                    shard(2, &[1, 2, 3], Some(1), 10),
                ],
                expect: Some(vec![tl(1, 3, 2)]),
            },
            Case {
                name: "one active node",
                nodes: vec![node(1, NodeState::Active), node(2, NodeState::Removed)],
                shards: vec![shard(1, &[1, 2, 3], Some(2), 10)],
                expect: Some(vec![tl(1, 2, 1)]),
            },
            Case {
                name: "no active nodes",
                nodes: vec![node(1, NodeState::Draining), node(2, NodeState::Removed)],
                shards: vec![shard(1, &[1, 2], Some(1), 10)],
                expect: Some(vec![]),
            },
        ];
        for case in cases {
            let (steps, _) = check(case.name, &case.nodes, &case.shards);
            if let Some(expect) = case.expect {
                assert_eq!(steps, expect, "{}", case.name);
            }
        }
    }

    #[test]
    fn node_added_empty_ends_with_three_each() {
        let nodes = active(&[1, 2, 3, 4]);
        let (steps, after) = check("added", &nodes, &balanced_three());
        assert_eq!(steps.len(), 3);
        assert!(steps.iter().all(|s| matches!(s, Step::Move { to: 4, .. })));
        for (id, replicas, leaders, _) in summarize(&nodes, &after) {
            assert_eq!(replicas, 3, "node {id}");
            assert_eq!(leaders, 1, "node {id}");
        }
    }

    #[test]
    fn draining_node_is_emptied() {
        let nodes: Vec<NodeView> = (1..=5)
            .map(|id| {
                let state = if id == 2 {
                    NodeState::Draining
                } else {
                    NodeState::Active
                };
                node(id, state)
            })
            .collect();
        let shards: Vec<ShardView> = (1..=10)
            .map(|i| {
                let a = i % 5 + 1;
                let b = (i + 1) % 5 + 1;
                let c = (i + 3) % 5 + 1;
                shard(i, &[a, b, c], Some(b), i * 100)
            })
            .collect();
        let on_two = shards.iter().filter(|s| s.replicas.contains(&2)).count();
        let (steps, after) = check("draining", &nodes, &shards);
        let from_two = steps
            .iter()
            .filter(|s| matches!(s, Step::Move { from: 2, .. }))
            .count();
        assert_eq!(from_two, on_two);
        assert!(after.iter().all(|s| !s.replicas.contains(&2)));
        assert!(after.iter().all(|s| s.leader != Some(2)));
    }

    #[test]
    fn leaders_on_one_node_are_spread() {
        // 12 shards on consecutive nodes: replica counts are already even.
        for n in [3u64, 4, 6] {
            let nodes = active(&(1..=n).collect::<Vec<_>>());
            let shards: Vec<ShardView> = (1..=12)
                .map(|i| {
                    let r: Vec<u64> = (0..3).map(|k| (i + k) % n + 1).collect();
                    let leader = if r.contains(&1) { 1 } else { r[0] };
                    shard(i, &r, Some(leader), 10)
                })
                .collect();
            let (steps, after) = check("leaders", &nodes, &shards);
            assert!(
                steps
                    .iter()
                    .all(|s| matches!(s, Step::TransferLeader { .. })),
                "{n} nodes: {steps:?}"
            );
            assert!(leader_spread(&nodes, &after) <= 1, "{n} nodes: {after:?}");
        }
    }

    #[test]
    fn one_heavy_node_is_evened_out() {
        let nodes = active(&[1, 2, 3, 4, 5]);
        let shards: Vec<ShardView> = (1..=6)
            .map(|i| {
                let others = [[2, 3], [2, 3], [2, 3], [4, 5], [2, 4], [3, 5]][i as usize - 1];
                shard(i, &[1, others[0], others[1]], Some(1), i * 100)
            })
            .collect();
        let (steps, after) = check("heavy", &nodes, &shards);
        // Node 1 -> node 4 (900 bytes): gap 1200, shard 6 (600) closes it.
        // Node 1 -> node 5 (1000 bytes): gap 500, shards 2 and 3 both leave
        // 100, the smaller wins. Leaders follow the moves, then node 1 hands
        // two more to the nodes leading none.
        assert_eq!(
            steps,
            vec![mv(6, 1, 4), mv(2, 1, 5), tl(1, 1, 2), tl(3, 1, 3)]
        );
        assert_eq!(
            summarize(&nodes, &after),
            vec![
                (1, 4, 2, 1300),
                (2, 4, 1, 1100),
                (3, 4, 1, 1200),
                (4, 3, 1, 1500),
                (5, 3, 1, 1200),
            ]
        );
    }

    #[test]
    fn pseudo_random_layouts_keep_invariants() {
        // Small LCG so the test is deterministic without extra crates.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |bound: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % bound
        };
        for round in 0..300 {
            let node_count = 1 + next(8);
            let nodes: Vec<NodeView> = (1..=node_count)
                .map(|id| {
                    let state = match next(6) {
                        0 => NodeState::Draining,
                        1 => NodeState::Removed,
                        _ => NodeState::Active,
                    };
                    node(id, state)
                })
                .collect();
            let shards: Vec<ShardView> = (1..=next(15))
                .map(|id| {
                    // Distinct replicas, possibly on unlisted node ids.
                    let mut replicas: Vec<u64> = Vec::new();
                    while replicas.len() < 3 {
                        let r = 1 + next(node_count.max(3) + 1);
                        if !replicas.contains(&r) {
                            replicas.push(r);
                        }
                    }
                    let leader = match next(4) {
                        0 => None,
                        k => Some(replicas[k as usize - 1]),
                    };
                    shard(id, &replicas, leader, next(1000))
                })
                .collect();
            check(&format!("round {round}"), &nodes, &shards);
        }
    }

    #[test]
    fn deterministic_regardless_of_input_order() {
        let nodes = vec![
            node(1, NodeState::Active),
            node(2, NodeState::Draining),
            node(3, NodeState::Active),
            node(4, NodeState::Active),
            node(5, NodeState::Active),
            node(6, NodeState::Removed),
        ];
        let shards: Vec<ShardView> = (1..=9)
            .map(|i| {
                let r = [i % 6 + 1, (i + 2) % 6 + 1, (i + 4) % 6 + 1];
                shard(i, &r, Some(r[(i % 3) as usize]), (i * 37) % 11 * 100)
            })
            .collect();
        let first = plan(&nodes, &shards);
        assert_eq!(plan(&nodes, &shards), first);
        assert!(!first.is_empty());
        let mut rev_nodes = nodes.clone();
        rev_nodes.reverse();
        let mut rev_shards = shards.clone();
        rev_shards.reverse();
        for s in &mut rev_shards {
            s.replicas.reverse();
        }
        assert_eq!(plan(&rev_nodes, &rev_shards), first);
        check("determinism", &nodes, &shards);
    }

    #[test]
    fn summarize_counts_every_listed_node() {
        let nodes = vec![node(3, NodeState::Active), node(1, NodeState::Removed)];
        let shards = vec![
            shard(1, &[1, 3], Some(3), u64::MAX),
            shard(2, &[3, 7], None, 5),
        ];
        assert_eq!(
            summarize(&nodes, &shards),
            vec![(1, 1, 0, u64::MAX), (3, 2, 1, u64::MAX)]
        );
    }

    #[test]
    fn meta_group_table() {
        let three = shard(META_SHARD, &[1, 2, 3], Some(1), 0);
        struct Case {
            name: &'static str,
            nodes: Vec<NodeView>,
            meta: ShardView,
            shards: Vec<ShardView>,
            want: Vec<Step>,
        }
        let cases = vec![
            Case {
                name: "all active: nothing to do, however uneven",
                nodes: active(&[1, 2, 3, 4, 5]),
                meta: three.clone(),
                shards: vec![shard(1, &[4, 5, 1], Some(4), 10)],
                want: vec![],
            },
            Case {
                name: "a draining meta node hands its replica to the emptiest active node",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Draining),
                    node(3, NodeState::Active),
                    node(4, NodeState::Active),
                    node(5, NodeState::Active),
                ],
                meta: three.clone(),
                // Node 4 holds two replicas, node 5 one.
                shards: vec![
                    shard(1, &[1, 3, 4], Some(1), 10),
                    shard(2, &[3, 4, 5], Some(3), 10),
                ],
                want: vec![mv(META_SHARD, 2, 5)],
            },
            Case {
                name: "the leader's replica moves and takes leadership along",
                nodes: vec![
                    node(1, NodeState::Draining),
                    node(2, NodeState::Active),
                    node(3, NodeState::Active),
                    node(4, NodeState::Active),
                ],
                meta: three.clone(),
                shards: vec![],
                want: vec![mv(META_SHARD, 1, 4)],
            },
            Case {
                name: "equal replica counts: fewer bytes, then the lower id",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Active),
                    node(3, NodeState::Removed),
                    node(4, NodeState::Active),
                    node(5, NodeState::Active),
                    node(6, NodeState::Active),
                ],
                meta: three.clone(),
                shards: vec![
                    shard(1, &[4, 1, 2], None, 100),
                    shard(2, &[5, 1, 2], None, 10),
                    shard(3, &[6, 1, 2], None, 10),
                ],
                want: vec![mv(META_SHARD, 3, 5)],
            },
            Case {
                name: "two meta nodes leave: two moves, in node order",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Draining),
                    node(3, NodeState::Draining),
                    node(4, NodeState::Active),
                    node(5, NodeState::Active),
                ],
                meta: shard(META_SHARD, &[1, 2, 3], Some(3), 0),
                shards: vec![],
                want: vec![mv(META_SHARD, 2, 4), mv(META_SHARD, 3, 5)],
            },
            Case {
                name: "nowhere to go: the replica stays, its leadership leaves",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Draining),
                    node(3, NodeState::Active),
                ],
                meta: shard(META_SHARD, &[1, 2, 3], Some(2), 0),
                shards: vec![],
                want: vec![tl(META_SHARD, 2, 1)],
            },
            Case {
                name: "a five-node meta group on six nodes",
                nodes: vec![
                    node(1, NodeState::Active),
                    node(2, NodeState::Active),
                    node(3, NodeState::Active),
                    node(4, NodeState::Active),
                    node(5, NodeState::Draining),
                    node(6, NodeState::Active),
                ],
                meta: shard(META_SHARD, &[1, 2, 3, 4, 5], Some(1), 0),
                shards: vec![],
                want: vec![mv(META_SHARD, 5, 6)],
            },
        ];
        for case in cases {
            let got = plan_meta(&case.nodes, &case.meta, &case.shards);
            assert_eq!(got, case.want, "{}", case.name);
            // Planning the result again finds nothing to do.
            let mut after = case.meta.clone();
            for step in &got {
                match *step {
                    Step::Move { from, to, .. } => {
                        for r in after.replicas.iter_mut().filter(|r| **r == from) {
                            *r = to;
                        }
                        if after.leader == Some(from) {
                            after.leader = Some(to);
                        }
                    }
                    Step::TransferLeader { to, .. } => after.leader = Some(to),
                }
            }
            let again = plan_meta(&case.nodes, &after, &case.shards);
            assert!(again.is_empty(), "{}: planned again: {again:?}", case.name);
        }
    }

    #[test]
    fn steps_display() {
        assert_eq!(mv(3, 2, 4).to_string(), "move shard 3: node 2 -> node 4");
        assert_eq!(
            tl(3, 1, 2).to_string(),
            "leader of shard 3: node 1 -> node 2"
        );
        assert_eq!(
            mv(META_SHARD, 2, 4).to_string(),
            "move the meta group: node 2 -> node 4"
        );
        assert_eq!(
            tl(META_SHARD, 2, 1).to_string(),
            "leader of the meta group: node 2 -> node 1"
        );
    }
}
