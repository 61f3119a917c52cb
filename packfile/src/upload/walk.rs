//! Object enumeration for `wants ^haves`: a date-ordered commit walk with
//! uninteresting propagation (stopping once only uninteresting commits
//! remain), then the trees of the boundary commits are marked uninteresting,
//! then interesting commits, trees, blobs and tags are collected, honouring
//! shallow boundaries and partial-clone filters.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use gix_hash::ObjectId;
use gix_object::Kind;

use super::filter::Filter;
use super::objects::{parse_tag, tree_entries, CommitCache, EntryKind};
use super::UploadError;
use crate::refs::RepoRefs;
use crate::store::{ObjectReader, PackSet};

const SEEN: u8 = 1;
const UNINTERESTING: u8 = 2;
const DONE: u8 = 4;
/// How many extra uninteresting commits to process once everything left
/// looks uninteresting, to tolerate clock skew (git uses the same slop).
const SLOP: u32 = 5;

/// Result of the commit walk.
pub(crate) struct CommitWalk {
    /// Interesting commits, newest first.
    pub interesting: Vec<ObjectId>,
    flags: HashMap<ObjectId, u8>,
}

impl CommitWalk {
    pub fn is_uninteresting(&self, id: &ObjectId) -> bool {
        self.flags.get(id).is_some_and(|f| f & UNINTERESTING != 0)
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    time: i64,
    seq: Reverse<u64>,
    id: ObjectId,
}

/// Walks commits reachable from `tips` but not from `bottoms`. Commits in
/// `shallow` are treated as parentless. With `max_age`, older commits
/// count as uninteresting (and so do their ancestors), like `--max-age`.
pub(crate) fn commit_walk(
    cache: &mut CommitCache<'_>,
    tips: &[ObjectId],
    bottoms: &[ObjectId],
    shallow: &HashSet<ObjectId>,
    max_age: Option<i64>,
) -> Result<CommitWalk, UploadError> {
    let mut flags: HashMap<ObjectId, u8> = HashMap::new();
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Queued>, id: ObjectId, time: i64| {
        seq += 1;
        heap.push(Queued {
            time,
            seq: Reverse(seq),
            id,
        });
    };
    for b in bottoms {
        if let Some(c) = cache.get(b)? {
            let time = c.time;
            if flags.insert(*b, SEEN | UNINTERESTING).is_none() {
                push(&mut heap, *b, time);
            }
        }
    }
    for t in tips {
        if flags.contains_key(t) {
            continue;
        }
        let time = cache.require(t)?.time;
        flags.insert(*t, SEEN);
        push(&mut heap, *t, time);
    }

    let mut order = Vec::new();
    let mut last_interesting = i64::MAX;
    let mut slop = SLOP;
    while let Some(Queued { id, .. }) = heap.pop() {
        let info = cache.require(&id)?;
        let (time, parents) = (info.time, info.parents.clone());
        let f = flags.entry(id).or_insert(SEEN);
        if max_age.is_some_and(|age| time < age) {
            *f |= UNINTERESTING;
        }
        *f |= DONE;
        let unint = *f & UNINTERESTING != 0;
        let parents = if shallow.contains(&id) {
            Vec::new()
        } else {
            parents
        };
        for p in parents {
            let Some(pc) = cache.get(&p)? else { continue };
            let ptime = pc.time;
            let pf = flags.entry(p).or_insert(0);
            if unint && *pf & UNINTERESTING == 0 {
                *pf |= UNINTERESTING;
                if *pf & DONE != 0 {
                    propagate_uninteresting(cache, &mut flags, shallow, p);
                }
            }
            let pf = flags.entry(p).or_insert(0);
            if *pf & SEEN == 0 {
                *pf |= SEEN;
                push(&mut heap, p, ptime);
            }
        }
        if !unint {
            last_interesting = time;
            order.push(id);
            continue;
        }
        // Decide whether anything interesting can still come out of the queue.
        let Some(newest) = heap.peek() else { break };
        if last_interesting <= newest.time
            || heap
                .iter()
                .any(|q| flags.get(&q.id).is_some_and(|f| f & UNINTERESTING == 0))
        {
            slop = SLOP;
            continue;
        }
        slop -= 1;
        if slop == 0 {
            break;
        }
    }
    order.retain(|id| flags.get(id).is_some_and(|f| f & UNINTERESTING == 0));
    Ok(CommitWalk {
        interesting: order,
        flags,
    })
}

/// Marks the already-processed ancestors of `start` uninteresting.
fn propagate_uninteresting(
    cache: &CommitCache<'_>,
    flags: &mut HashMap<ObjectId, u8>,
    shallow: &HashSet<ObjectId>,
    start: ObjectId,
) {
    let mut stack = vec![start];
    while let Some(id) = stack.pop() {
        if shallow.contains(&id) {
            continue;
        }
        let Some(c) = cache.cached(&id) else { continue };
        for p in &c.parents {
            let pf = flags.entry(*p).or_insert(0);
            if *pf & UNINTERESTING == 0 {
                *pf |= UNINTERESTING;
                if *pf & DONE != 0 {
                    stack.push(*p);
                }
            }
        }
    }
}

/// What to enumerate.
pub struct WalkInput<'a> {
    /// Objects the client asked for (commits, tags, trees or blobs).
    pub wants: &'a [ObjectId],
    /// Objects the client has, with everything reachable from them.
    pub haves: &'a [ObjectId],
    /// Commits whose parents are hidden (the client's and the new shallow boundary).
    pub shallow: &'a HashSet<ObjectId>,
    pub filter: Option<Filter>,
    /// With `include-tag`: the refs whose annotated tags may be added.
    pub include_tags: Option<&'a RepoRefs>,
}

/// One object to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedObject {
    pub id: ObjectId,
    pub kind: Kind,
    /// Hash of the path the object was found at (0 for commits and tags);
    /// used to pair new objects with the client's version as delta base.
    pub path_hash: u64,
}

/// The outcome of the walk: objects to send and objects the client has.
#[derive(Debug, Default)]
pub struct ObjectPlan {
    pub objects: Vec<PlannedObject>,
    /// Objects known to be on the client (trees and blobs of the boundary
    /// commits, the boundary commits themselves): candidate thin-pack bases.
    pub client_has: HashMap<ObjectId, Kind>,
    /// The client's object at a given path hash, for delta pairing.
    pub client_by_path: HashMap<u64, ObjectId>,
}

fn path_hash(path: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    // Zero means "no path".
    h.finish() | 1
}

fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(base.len() + name.len() + 1);
    p.extend_from_slice(base);
    if !base.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// The size of `id` from pack headers alone (no full decode).
pub(crate) fn object_size(packs: &PackSet, id: &ObjectId) -> Option<u64> {
    let loc = packs.locate(id)?;
    let bundle = &packs.bundles()[loc.pack];
    let entry = bundle.pack.entry(loc.offset).ok()?;
    let mut inflate = gix_zlib::Inflate::default();
    let resolve = |base: &gix_hash::oid| {
        Ok(bundle.index.lookup(base).and_then(|i| {
            bundle
                .pack
                .entry(bundle.index.pack_offset_at_index(i))
                .ok()
                .map(gix_pack::data::decode::header::ResolvedBase::InPack)
        }))
    };
    bundle
        .pack
        .decode_header(entry, &mut inflate, &resolve)
        .ok()
        .map(|o| o.object_size)
}

/// Enumerates the objects to send for `input`.
pub fn plan_objects(
    reader: &ObjectReader<'_>,
    input: &WalkInput<'_>,
) -> Result<ObjectPlan, UploadError> {
    let mut cache = CommitCache::new(reader);
    let mut buf = Vec::new();
    let mut plan = ObjectPlan::default();
    let mut added: HashSet<ObjectId> = HashSet::new();

    // Haves: commits bound the walk; other objects (and the objects tags
    // point to) are simply known to the client.
    let mut have_commits = Vec::new();
    for h in input.haves {
        let mut cur = *h;
        while let Some((kind, data)) = reader.find(&cur, &mut buf)? {
            match kind {
                Kind::Commit => {
                    have_commits.push(cur);
                    break;
                }
                Kind::Tag => {
                    plan.client_has.insert(cur, Kind::Tag);
                    cur = parse_tag(&cur, data)?.0;
                }
                other => {
                    plan.client_has.insert(cur, other);
                    break;
                }
            }
        }
    }

    // Wants: peel tags; named trees and blobs bypass the filter.
    let mut want_commits = Vec::new();
    let mut want_trees = Vec::new();
    let mut want_blobs = Vec::new();
    for w in input.wants {
        let mut cur = *w;
        loop {
            let Some((kind, data)) = reader.find(&cur, &mut buf)? else {
                return Err(UploadError::NotOurRef { id: cur });
            };
            match kind {
                Kind::Tag => {
                    let target = parse_tag(&cur, data)?.0;
                    if !plan.client_has.contains_key(&cur) && added.insert(cur) {
                        plan.objects.push(PlannedObject {
                            id: cur,
                            kind,
                            path_hash: 0,
                        });
                    }
                    cur = target;
                }
                Kind::Commit => {
                    want_commits.push(cur);
                    break;
                }
                Kind::Tree => {
                    want_trees.push(cur);
                    break;
                }
                Kind::Blob => {
                    want_blobs.push(cur);
                    break;
                }
            }
        }
    }

    let walk = commit_walk(
        &mut cache,
        &want_commits,
        &have_commits,
        input.shallow,
        None,
    )?;

    // Boundary: uninteresting parents of interesting commits. With a shallow
    // client also every uninteresting tip, since its history may be cut off
    // before any parent relationship connects it to what we send.
    let mut boundary = Vec::new();
    let mut boundary_seen = HashSet::new();
    for c in &walk.interesting {
        if input.shallow.contains(c) {
            continue;
        }
        let parents = cache.require(c)?.parents.clone();
        for p in parents {
            if walk.is_uninteresting(&p) && boundary_seen.insert(p) {
                boundary.push(p);
            }
        }
    }
    if !input.shallow.is_empty() {
        for h in &have_commits {
            if boundary_seen.insert(*h) {
                boundary.push(*h);
            }
        }
    }
    for b in &boundary {
        plan.client_has.insert(*b, Kind::Commit);
        let tree = cache.require(b)?.tree;
        mark_tree_uninteresting(reader, &mut plan, tree)?;
    }

    // Interesting objects.
    for c in &walk.interesting {
        if added.insert(*c) {
            plan.objects.push(PlannedObject {
                id: *c,
                kind: Kind::Commit,
                path_hash: 0,
            });
        }
    }
    let mut collector = TreeCollector {
        reader,
        packs: reader.packs(),
        filter: input.filter,
        tree_depth: HashMap::new(),
        added: &mut added,
        plan: &mut plan,
        buf: Vec::new(),
    };
    for c in &walk.interesting {
        let tree = cache.require(c)?.tree;
        collector.walk(tree, false)?;
    }
    for t in want_trees {
        collector.walk(t, true)?;
    }
    for b in want_blobs {
        if !collector.plan.client_has.contains_key(&b) && collector.added.insert(b) {
            collector.plan.objects.push(PlannedObject {
                id: b,
                kind: Kind::Blob,
                path_hash: 0,
            });
        }
    }

    if let Some(refs) = input.include_tags {
        add_included_tags(reader, refs, &mut added, &mut plan)?;
    }
    Ok(plan)
}

fn mark_tree_uninteresting(
    reader: &ObjectReader<'_>,
    plan: &mut ObjectPlan,
    root: ObjectId,
) -> Result<(), UploadError> {
    let mut buf = Vec::new();
    let mut stack = vec![(root, Vec::new())];
    while let Some((id, path)) = stack.pop() {
        if plan.client_has.insert(id, Kind::Tree).is_some() {
            continue;
        }
        plan.client_by_path.entry(path_hash(&path)).or_insert(id);
        let Some((Kind::Tree, data)) = reader.find(&id, &mut buf)? else {
            continue; // missing or odd: simply not a usable base
        };
        for entry in tree_entries(&id, data) {
            let entry = entry?;
            let child = join(&path, entry.name);
            match entry.kind {
                EntryKind::Tree => stack.push((entry.id, child)),
                EntryKind::Blob => {
                    if plan.client_has.insert(entry.id, Kind::Blob).is_none() {
                        plan.client_by_path
                            .entry(path_hash(&child))
                            .or_insert(entry.id);
                    }
                }
                EntryKind::Gitlink => {}
            }
        }
    }
    Ok(())
}

struct TreeCollector<'a, 'r> {
    reader: &'a ObjectReader<'r>,
    packs: &'a PackSet,
    filter: Option<Filter>,
    /// Smallest depth each tree was expanded at (depth filters may need a
    /// second visit when a tree shows up closer to a root).
    tree_depth: HashMap<ObjectId, u64>,
    added: &'a mut HashSet<ObjectId>,
    plan: &'a mut ObjectPlan,
    buf: Vec<u8>,
}

impl TreeCollector<'_, '_> {
    fn add(&mut self, id: ObjectId, kind: Kind, path: &[u8]) {
        if self.added.insert(id) {
            self.plan.objects.push(PlannedObject {
                id,
                kind,
                path_hash: path_hash(path),
            });
        }
    }

    /// Collects `root` and what it contains; `named` roots were wanted
    /// explicitly and are sent even if the filter would omit them.
    fn walk(&mut self, root: ObjectId, named: bool) -> Result<(), UploadError> {
        let mut stack = vec![(root, 0u64, Vec::new())];
        while let Some((id, depth, path)) = stack.pop() {
            if self.plan.client_has.contains_key(&id) {
                continue;
            }
            let is_root_named = named && depth == 0;
            if let Some(f) = self.filter {
                if !is_root_named && !f.wants_tree(depth) {
                    continue;
                }
            }
            match self.tree_depth.get(&id) {
                Some(&d) if d <= depth => continue,
                _ => {
                    self.tree_depth.insert(id, depth);
                }
            }
            self.add(id, Kind::Tree, &path);
            let Some((kind, data)) = self.reader.find(&id, &mut self.buf)? else {
                return Err(UploadError::Corrupt {
                    id,
                    message: "tree is missing".into(),
                });
            };
            if kind != Kind::Tree {
                return Err(UploadError::Corrupt {
                    id,
                    message: format!("expected a tree, found a {kind}"),
                });
            }
            let mut blobs = Vec::new();
            for entry in tree_entries(&id, data) {
                let entry = entry?;
                let child = join(&path, entry.name);
                match entry.kind {
                    EntryKind::Tree => stack.push((entry.id, depth + 1, child)),
                    EntryKind::Blob => blobs.push((entry.id, child)),
                    EntryKind::Gitlink => {}
                }
            }
            for (blob, child) in blobs {
                if self.added.contains(&blob) || self.plan.client_has.contains_key(&blob) {
                    continue;
                }
                let keep = match self.filter {
                    None => true,
                    Some(f) => f.wants_blob(|| object_size(self.packs, &blob), depth + 1),
                };
                if keep {
                    self.add(blob, Kind::Blob, &child);
                }
            }
        }
        Ok(())
    }
}

/// `include-tag`: annotated tags under `refs/tags/` whose peeled object is
/// being sent are sent too (with any tags in between).
fn add_included_tags(
    reader: &ObjectReader<'_>,
    refs: &RepoRefs,
    added: &mut HashSet<ObjectId>,
    plan: &mut ObjectPlan,
) -> Result<(), UploadError> {
    let mut buf = Vec::new();
    for r in refs
        .refs
        .iter()
        .filter(|r| r.name.starts_with("refs/tags/"))
    {
        let mut chain = Vec::new();
        let mut cur = r.target;
        let mut peeled = None;
        for _ in 0..64 {
            match reader.find(&cur, &mut buf)? {
                Some((Kind::Tag, data)) => {
                    chain.push(cur);
                    cur = parse_tag(&cur, data)?.0;
                }
                Some(_) => {
                    peeled = Some(cur);
                    break;
                }
                None => break,
            }
        }
        if chain.is_empty() || !peeled.is_some_and(|p| added.contains(&p)) {
            continue;
        }
        for t in chain {
            if added.insert(t) {
                plan.objects.push(PlannedObject {
                    id: t,
                    kind: Kind::Tag,
                    path_hash: 0,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "C")
            .env("GIT_COMMITTER_EMAIL", "c@example.com")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn id(hex: &str) -> ObjectId {
        ObjectId::from_hex(hex.as_bytes()).expect("hex")
    }

    /// 60 linear commits, each touching `a/n.txt`; one pack.
    fn repo(dir: &Path) -> PackSet {
        git(dir, &["init", "-q", "r"]);
        let r = dir.join("r");
        std::fs::create_dir_all(r.join("a")).expect("mkdir");
        std::fs::write(r.join("stable.txt"), "unchanged\n").expect("write");
        for i in 0..60 {
            std::fs::write(r.join("a/n.txt"), format!("{i}\n")).expect("write");
            git(&r, &["add", "."]);
            let date = format!("@{} +0000", 1_577_836_800 + i * 60);
            let out = Command::new("git")
                .current_dir(&r)
                .args(["commit", "-q", "-m", &format!("c{i}")])
                .env("HOME", dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_AUTHOR_NAME", "A")
                .env("GIT_AUTHOR_EMAIL", "a@example.com")
                .env("GIT_COMMITTER_NAME", "C")
                .env("GIT_COMMITTER_EMAIL", "c@example.com")
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date)
                .status()
                .expect("commit");
            assert!(out.success());
        }
        git(&r, &["repack", "-a", "-d", "-q"]);
        let idx = std::fs::read_dir(r.join(".git/objects/pack"))
            .expect("packs")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))
            .expect("idx");
        PackSet::open(&[idx]).expect("open")
    }

    #[test]
    fn walk_stops_early_and_excludes_client_objects() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let packs = repo(tmp.path());
        let r = tmp.path().join("r");
        let tip = id(&git(&r, &["rev-parse", "HEAD"]));
        let have = id(&git(&r, &["rev-parse", "HEAD~2"]));
        let reader = packs.reader();
        let mut cache = CommitCache::new(&reader);
        let walk = commit_walk(&mut cache, &[tip], &[have], &HashSet::new(), None).expect("walk");
        assert_eq!(walk.interesting.len(), 2);
        assert!(cache.len() < 15, "walked {} commits of 60", cache.len());

        let shallow = HashSet::new();
        let plan = plan_objects(
            &reader,
            &WalkInput {
                wants: &[tip],
                haves: &[have],
                shallow: &shallow,
                filter: None,
                include_tags: None,
            },
        )
        .expect("plan");
        // Two commits, two root trees, two `a` trees, two blobs; never stable.txt.
        let stable = id(&git(&r, &["rev-parse", "HEAD:stable.txt"]));
        assert_eq!(plan.objects.len(), 8, "{:?}", plan.objects);
        assert!(plan.objects.iter().all(|o| o.id != stable));
        assert!(plan.client_has.contains_key(&stable));
        // The client's version of a/n.txt is known by path for delta pairing.
        let new_blob = plan
            .objects
            .iter()
            .find(|o| o.id == id(&git(&r, &["rev-parse", "HEAD:a/n.txt"])))
            .expect("new blob planned");
        let old_blob = id(&git(&r, &["rev-parse", "HEAD~2:a/n.txt"]));
        assert_eq!(
            plan.client_by_path.get(&new_blob.path_hash),
            Some(&old_blob)
        );
    }

    #[test]
    fn filters_and_shallow_boundaries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let packs = repo(tmp.path());
        let r = tmp.path().join("r");
        let tip = id(&git(&r, &["rev-parse", "HEAD"]));
        let reader = packs.reader();
        let shallow: HashSet<ObjectId> = [tip].into_iter().collect();
        let plan_with = |filter| {
            plan_objects(
                &reader,
                &WalkInput {
                    wants: &[tip],
                    haves: &[],
                    shallow: &shallow,
                    filter,
                    include_tags: None,
                },
            )
            .expect("plan")
        };
        let kinds = |p: &ObjectPlan, k: Kind| p.objects.iter().filter(|o| o.kind == k).count();
        let full = plan_with(None);
        assert_eq!(
            (
                kinds(&full, Kind::Commit),
                kinds(&full, Kind::Tree),
                kinds(&full, Kind::Blob)
            ),
            (1, 2, 2)
        );
        let none = plan_with(Some(Filter::BlobNone));
        assert_eq!((kinds(&none, Kind::Tree), kinds(&none, Kind::Blob)), (2, 0));
        let t0 = plan_with(Some(Filter::TreeDepth(0)));
        assert_eq!(t0.objects.len(), 1);
        let t1 = plan_with(Some(Filter::TreeDepth(1)));
        assert_eq!((kinds(&t1, Kind::Tree), kinds(&t1, Kind::Blob)), (1, 0));
        let t2 = plan_with(Some(Filter::TreeDepth(2)));
        assert_eq!((kinds(&t2, Kind::Tree), kinds(&t2, Kind::Blob)), (2, 1));
    }
}
