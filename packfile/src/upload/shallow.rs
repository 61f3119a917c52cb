//! Shallow clones: computing the new shallow boundary for `deepen <n>`,
//! `deepen-since`, `deepen-not` and `deepen-relative`, and which of the
//! client's shallow commits become complete (`unshallow`).

use std::collections::{HashMap, HashSet, VecDeque};

use gix_hash::ObjectId;
use gix_object::Kind;

use super::objects::{peel, CommitCache};
use super::request::{FetchRequest, INFINITE_DEPTH};
use super::walk::commit_walk;
use super::UploadError;
use crate::refs::RepoRefs;

/// The shallow-related outcome of a request.
#[derive(Debug, Default)]
pub(crate) struct ShallowPlan {
    /// Whether `shallow`/`unshallow` lines are to be sent (a deepen was requested).
    pub send_list: bool,
    /// New shallow commits to announce.
    pub shallow: Vec<ObjectId>,
    /// Client shallow commits whose history is now sent.
    pub unshallow: Vec<ObjectId>,
    /// Commits the pack walk treats as parentless.
    pub boundary: HashSet<ObjectId>,
    /// Parents of unshallowed commits: wanted in addition.
    pub extra_wants: Vec<ObjectId>,
    /// Unshallowed commits: the client has them (and their trees).
    pub extra_haves: Vec<ObjectId>,
}

/// Computes the shallow plan for `req` whose commit wants are `wants`.
pub(crate) fn plan_shallow(
    cache: &mut CommitCache<'_>,
    refs: &RepoRefs,
    req: &FetchRequest,
) -> Result<ShallowPlan, UploadError> {
    let mut plan = ShallowPlan::default();
    // Client shallows we do not have are ignored, as git does.
    let mut client: Vec<ObjectId> = Vec::new();
    for s in &req.client_shallows {
        if !cache.reader.packs().contains(s) {
            continue;
        }
        if cache.get(s)?.is_none() {
            return Err(UploadError::protocol(format!("invalid shallow object {s}")));
        }
        if !client.contains(s) {
            client.push(*s);
        }
    }
    let client_set: HashSet<ObjectId> = client.iter().copied().collect();

    if req.depth > 0 && (req.deepen_since.is_some() || !req.deepen_not.is_empty()) {
        return Err(UploadError::protocol(
            "deepen cannot be used with other deepen options",
        ));
    }

    let mut want_commits = Vec::new();
    for w in &req.wants {
        if let Some((c, Kind::Commit)) = peel(cache.reader, w)? {
            want_commits.push(c);
        }
    }

    // `not_shallow`: commits whose parents the client will now have.
    let mut not_shallow: HashSet<ObjectId> = HashSet::new();
    if req.depth == INFINITE_DEPTH {
        plan.send_list = true;
        not_shallow.extend(client.iter().copied());
    } else if req.depth > 0 {
        plan.send_list = true;
        let (heads, depth) = if req.deepen_relative {
            (client.clone(), req.depth.saturating_add(1))
        } else {
            (want_commits.clone(), req.depth)
        };
        let (shallow, inner) = shallow_by_depth(cache, &heads, depth)?;
        not_shallow = inner;
        plan.shallow = shallow
            .into_iter()
            .filter(|c| !client_set.contains(c) && !not_shallow.contains(c))
            .collect();
    } else if req.deepen_since.is_some() || !req.deepen_not.is_empty() {
        plan.send_list = true;
        let mut excluded = Vec::new();
        for name in &req.deepen_not {
            let id = resolve_ref(refs, name)
                .ok_or_else(|| UploadError::protocol(format!("ambiguous deepen-not: {name}")))?;
            if let Some((c, Kind::Commit)) = peel(cache.reader, &id)? {
                excluded.push(c);
            }
        }
        let walk = commit_walk(
            cache,
            &want_commits,
            &excluded,
            &HashSet::new(),
            req.deepen_since,
        )?;
        if walk.interesting.is_empty() {
            return Err(UploadError::protocol(
                "no commits selected for shallow requests",
            ));
        }
        let included: HashSet<ObjectId> = walk.interesting.iter().copied().collect();
        for c in &walk.interesting {
            let parents = &cache.require(c)?.parents;
            if parents.iter().any(|p| !included.contains(p)) {
                plan.shallow.push(*c);
            } else {
                not_shallow.insert(*c);
            }
        }
        plan.shallow.retain(|c| !client_set.contains(c));
    }

    for s in &client {
        if not_shallow.contains(s) {
            plan.unshallow.push(*s);
            plan.extra_wants
                .extend(cache.require(s)?.parents.iter().copied());
            plan.extra_haves.push(*s);
        }
    }
    plan.boundary.extend(client.iter().copied());
    plan.boundary.extend(plan.shallow.iter().copied());
    Ok(plan)
}

/// Breadth-first from `heads` (depth 1): returns commits at exactly `depth`
/// (the new boundary) and the commits above it.
fn shallow_by_depth(
    cache: &mut CommitCache<'_>,
    heads: &[ObjectId],
    depth: u32,
) -> Result<(Vec<ObjectId>, HashSet<ObjectId>), UploadError> {
    let mut dist: HashMap<ObjectId, u32> = HashMap::new();
    let mut queue = VecDeque::new();
    for h in heads {
        if cache.get(h)?.is_some() && !dist.contains_key(h) {
            dist.insert(*h, 1);
            queue.push_back(*h);
        }
    }
    let mut shallow = Vec::new();
    let mut inner = HashSet::new();
    while let Some(id) = queue.pop_front() {
        let d = dist[&id];
        if d >= depth {
            shallow.push(id);
            continue;
        }
        inner.insert(id);
        let parents = cache.require(&id)?.parents.clone();
        for p in parents {
            if cache.get(&p)?.is_none() || dist.contains_key(&p) {
                continue;
            }
            dist.insert(p, d + 1);
            queue.push_back(p);
        }
    }
    Ok((shallow, inner))
}

/// Resolves a ref name the way `git rev-parse` would for `deepen-not`.
fn resolve_ref(refs: &RepoRefs, name: &str) -> Option<ObjectId> {
    if name == "HEAD" {
        return refs.head_target();
    }
    [
        name.to_owned(),
        format!("refs/{name}"),
        format!("refs/tags/{name}"),
        format!("refs/heads/{name}"),
        format!("refs/remotes/{name}"),
        format!("refs/remotes/{name}/HEAD"),
    ]
    .iter()
    .find_map(|n| refs.get(n))
}
