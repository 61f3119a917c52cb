//! The pure decision of which ref updates of a push may be applied: a
//! compare-and-swap of each command's `old` against the current refs, ref
//! name validity, directory/file conflicts, errors found earlier (pack
//! validation, connectivity) and the all-or-nothing rule of `atomic`.
//!
//! The caller applies the accepted updates with the same compare-and-swap
//! semantics against its durable store; this plan is what it reports.

use std::collections::{BTreeSet, HashSet};
use std::ops::Bound;

use super::refname::check_ref_name;
use super::Command;
use crate::refs::RepoRefs;

/// Reason given to commands that were fine themselves but share an atomic
/// push with one that failed.
pub const ATOMIC_FAILED: &str = "atomic push failed";

/// Decides each command's fate; `prior[i]`, if present, is an error already
/// found for command `i` (a missing `prior` entry means none).
pub fn plan_updates(
    current: &RepoRefs,
    commands: &[Command],
    atomic: bool,
    prior: &[Option<String>],
) -> Vec<Result<(), String>> {
    let mut seen = HashSet::new();
    let duplicated: HashSet<&str> = commands
        .iter()
        .filter(|c| !seen.insert(c.name.as_str()))
        .map(|c| c.name.as_str())
        .collect();

    let mut results: Vec<Result<(), String>> = commands
        .iter()
        .enumerate()
        .map(|(i, cmd)| {
            if let Some(Some(err)) = prior.get(i) {
                return Err(err.clone());
            }
            check_one(current, cmd, duplicated.contains(cmd.name.as_str()))
        })
        .collect();

    check_directory_conflicts(current, commands, &mut results);

    if atomic && results.iter().any(Result::is_err) {
        for r in &mut results {
            if r.is_ok() {
                *r = Err(ATOMIC_FAILED.to_owned());
            }
        }
    }
    results
}

fn check_one(current: &RepoRefs, cmd: &Command, duplicated: bool) -> Result<(), String> {
    if check_ref_name(&cmd.name).is_err() {
        // git's wording, which clients and scripts recognise.
        return Err("funny refname".to_owned());
    }
    if duplicated {
        return Err("multiple updates for ref".to_owned());
    }
    if cmd.old.is_null() && cmd.new.is_null() {
        return Err("bad command: old and new are both zero".to_owned());
    }
    let now = current.get(&cmd.name);
    match now {
        Some(_) if cmd.old.is_null() => return Err("stale info: ref already exists".to_owned()),
        None if !cmd.old.is_null() => return Err("stale info: ref does not exist".to_owned()),
        Some(now) if now != cmd.old => {
            return Err(format!(
                "stale info: ref is at {}, not {}",
                now.to_hex_with_len(7),
                cmd.old.to_hex_with_len(7)
            ))
        }
        _ => {}
    }
    if cmd.new.is_null() && current.head.as_deref() == Some(cmd.name.as_str()) {
        return Err("deletion of the current branch prohibited".to_owned());
    }
    Ok(())
}

/// Refs are files in git's layout, so `refs/heads/a` and `refs/heads/a/b`
/// cannot coexist; refuse creations that would make clients unable to fetch.
fn check_directory_conflicts(
    current: &RepoRefs,
    commands: &[Command],
    results: &mut [Result<(), String>],
) {
    let deleted: HashSet<&str> = commands
        .iter()
        .zip(results.iter())
        .filter(|(c, r)| r.is_ok() && c.is_delete())
        .map(|(c, _)| c.name.as_str())
        .collect();
    let mut after: BTreeSet<&str> = current
        .refs
        .iter()
        .map(|r| r.name.as_str())
        .filter(|n| !deleted.contains(n))
        .collect();
    for (c, r) in commands.iter().zip(results.iter()) {
        if r.is_ok() && c.is_create() {
            after.insert(c.name.as_str());
        }
    }
    for (c, r) in commands.iter().zip(results.iter_mut()) {
        if r.is_err() || !c.is_create() {
            continue;
        }
        if let Some(other) = conflict_with(&after, &c.name) {
            *r = Err(format!("failed to lock: conflicts with {other}"));
        }
    }
}

fn conflict_with<'a>(names: &BTreeSet<&'a str>, name: &str) -> Option<&'a str> {
    for (i, _) in name.match_indices('/') {
        if let Some(parent) = names.get(&name[..i]) {
            return Some(parent);
        }
    }
    let child_prefix = format!("{name}/");
    names
        .range::<str, _>((Bound::Included(child_prefix.as_str()), Bound::Unbounded))
        .next()
        .filter(|n| n.starts_with(&child_prefix))
        .copied()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::refs::RefRecord;
    use gix_hash::ObjectId;

    fn id(n: u8) -> ObjectId {
        if n == 0 {
            return gix_hash::Kind::Sha1.null();
        }
        ObjectId::from_bytes_or_panic(&[n; 20])
    }

    fn refs() -> RepoRefs {
        RepoRefs::new(
            vec![
                RefRecord {
                    name: "refs/heads/main".into(),
                    target: id(1),
                },
                RefRecord {
                    name: "refs/heads/dev".into(),
                    target: id(2),
                },
                RefRecord {
                    name: "refs/heads/dir".into(),
                    target: id(2),
                },
                RefRecord {
                    name: long_existing(),
                    target: id(2),
                },
            ],
            Some("refs/heads/main".into()),
        )
    }

    /// A ref stored before the length cap existed.
    fn long_existing() -> String {
        format!("refs/heads/{}", "l".repeat(65_000 - 11))
    }

    fn cmd(old: u8, new: u8, name: &str) -> Command {
        Command {
            old: id(old),
            new: id(new),
            name: name.into(),
        }
    }

    /// Each row: commands, atomic, prior errors, expected results (`None` =
    /// ok, `Some(prefix)` = error starting with prefix).
    #[test]
    fn table() {
        type Row = (
            Vec<Command>,
            bool,
            Vec<Option<String>>,
            Vec<Option<&'static str>>,
        );
        let rows: Vec<Row> = vec![
            // plain fast path: update, create, delete
            (
                vec![
                    cmd(1, 3, "refs/heads/main"),
                    cmd(0, 3, "refs/heads/new"),
                    cmd(2, 0, "refs/heads/dev"),
                ],
                false,
                vec![],
                vec![None, None, None],
            ),
            // stale old value
            (
                vec![cmd(9, 3, "refs/heads/main")],
                false,
                vec![],
                vec![Some("stale info: ref is at 0101010, not 0909090")],
            ),
            // create existing, update missing, delete missing
            (
                vec![
                    cmd(0, 3, "refs/heads/main"),
                    cmd(4, 3, "refs/heads/nope"),
                    cmd(4, 0, "refs/heads/gone"),
                ],
                false,
                vec![],
                vec![
                    Some("stale info: ref already exists"),
                    Some("stale info: ref does not exist"),
                    Some("stale info: ref does not exist"),
                ],
            ),
            // funny names
            (
                vec![
                    cmd(0, 3, "HEAD"),
                    cmd(0, 3, "refs/heads/a..b"),
                    cmd(0, 3, "refs/heads/ok"),
                ],
                false,
                vec![],
                vec![Some("funny refname"), Some("funny refname"), None],
            ),
            // atomic: one stale makes all fail
            (
                vec![cmd(1, 3, "refs/heads/main"), cmd(9, 3, "refs/heads/dev")],
                true,
                vec![],
                vec![Some(ATOMIC_FAILED), Some("stale info")],
            ),
            // atomic, all fine
            (
                vec![cmd(1, 3, "refs/heads/main"), cmd(2, 3, "refs/heads/dev")],
                true,
                vec![],
                vec![None, None],
            ),
            // prior errors win and count for atomic
            (
                vec![cmd(1, 3, "refs/heads/main"), cmd(2, 3, "refs/heads/dev")],
                false,
                vec![None, Some("missing necessary objects".into())],
                vec![None, Some("missing necessary objects")],
            ),
            (
                vec![cmd(1, 3, "refs/heads/main"), cmd(2, 3, "refs/heads/dev")],
                true,
                vec![Some("missing necessary objects".into()), None],
                vec![Some("missing necessary objects"), Some(ATOMIC_FAILED)],
            ),
            // deleting the branch HEAD points to
            (
                vec![cmd(1, 0, "refs/heads/main")],
                false,
                vec![],
                vec![Some("deletion of the current branch prohibited")],
            ),
            // duplicates
            (
                vec![cmd(1, 3, "refs/heads/main"), cmd(1, 4, "refs/heads/main")],
                false,
                vec![],
                vec![
                    Some("multiple updates for ref"),
                    Some("multiple updates for ref"),
                ],
            ),
            // null to null
            (
                vec![cmd(0, 0, "refs/heads/x")],
                false,
                vec![],
                vec![Some("bad command")],
            ),
            // directory/file conflicts, existing and within the push
            (
                vec![
                    cmd(0, 3, "refs/heads/dir/sub"),
                    cmd(0, 3, "refs/heads/main/x"),
                    cmd(0, 3, "refs/heads/p"),
                    cmd(0, 3, "refs/heads/p/q"),
                ],
                false,
                vec![],
                vec![
                    Some("failed to lock: conflicts with refs/heads/dir"),
                    Some("failed to lock: conflicts with refs/heads/main"),
                    Some("failed to lock: conflicts with refs/heads/p/q"),
                    Some("failed to lock: conflicts with refs/heads/p"),
                ],
            ),
            // deleting the parent in the same push frees the name
            (
                vec![cmd(2, 0, "refs/heads/dir"), cmd(0, 3, "refs/heads/dir/sub")],
                false,
                vec![],
                vec![None, None],
            ),
            // a name of any length stored earlier stays deletable (the
            // length cap is the leader's, in `ingest`)
            (vec![cmd(2, 0, &long_existing())], false, vec![], vec![None]),
            // a sibling with a common prefix is no conflict
            (
                vec![cmd(0, 3, "refs/heads/dir-2"), cmd(0, 3, "refs/heads/di")],
                false,
                vec![],
                vec![None, None],
            ),
        ];
        for (i, (cmds, atomic, prior, want)) in rows.into_iter().enumerate() {
            let got = plan_updates(&refs(), &cmds, atomic, &prior);
            assert_eq!(got.len(), want.len(), "row {i}");
            for (g, w) in got.iter().zip(&want) {
                match (g, w) {
                    (Ok(()), None) => {}
                    (Err(e), Some(prefix)) if e.starts_with(prefix) => {}
                    _ => panic!("row {i}: got {got:?}, want {want:?}"),
                }
            }
        }
    }
}
