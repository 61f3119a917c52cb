//! Branch restrictions in Bitbucket Cloud's model: per repository, each
//! restricts one `kind` on the branches it matches, by glob or by branch
//! type of the branching model.
//!
//! `push`, `force` and `delete` are enforced when a push is received;
//! the merge checks (`require_approvals_to_merge`, …) are stored for pull
//! requests to enforce.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestrictionKind {
    /// Only the listed users may push.
    Push,
    /// Nobody may rewrite history (non-fast-forward updates).
    Force,
    /// Nobody may delete the branch.
    Delete,
    RequireApprovalsToMerge,
    RequireNoChangesRequested,
    ResetPullrequestApprovalsOnChange,
    RequirePassingBuildsToMerge,
}

impl RestrictionKind {
    pub const ALL: [RestrictionKind; 7] = [
        RestrictionKind::Push,
        RestrictionKind::Force,
        RestrictionKind::Delete,
        RestrictionKind::RequireApprovalsToMerge,
        RestrictionKind::RequireNoChangesRequested,
        RestrictionKind::ResetPullrequestApprovalsOnChange,
        RestrictionKind::RequirePassingBuildsToMerge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestrictionKind::Push => "push",
            RestrictionKind::Force => "force",
            RestrictionKind::Delete => "delete",
            RestrictionKind::RequireApprovalsToMerge => "require_approvals_to_merge",
            RestrictionKind::RequireNoChangesRequested => "require_no_changes_requested",
            RestrictionKind::ResetPullrequestApprovalsOnChange => {
                "reset_pullrequest_approvals_on_change"
            }
            RestrictionKind::RequirePassingBuildsToMerge => "require_passing_builds_to_merge",
        }
    }

    pub fn parse(s: &str) -> Option<RestrictionKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Kinds that carry a number (approvals, builds).
    pub fn takes_value(self) -> bool {
        matches!(
            self,
            RestrictionKind::RequireApprovalsToMerge | RestrictionKind::RequirePassingBuildsToMerge
        )
    }
}

/// Which branches a restriction covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchMatch {
    /// A glob over the branch name: `*` any run of characters (`/`
    /// included), `?` one character.
    Glob(String),
    /// A branch type of the branching model: `development` (the main
    /// branch), `production` (none unless configured), `feature`, `bugfix`,
    /// `release`, `hotfix` (branches under `<type>/`).
    BranchingModel(String),
}

pub const BRANCH_TYPES: [&str; 6] = [
    "development",
    "production",
    "feature",
    "bugfix",
    "release",
    "hotfix",
];

/// Longest glob, and most users a restriction lists.
pub const MAX_PATTERN_LEN: usize = 255;
pub const MAX_USERS: usize = 100;
/// Most restrictions one repository holds.
pub const MAX_PER_REPO: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRestriction {
    /// Assigned when stored; unique within the repository.
    pub id: u64,
    pub kind: RestrictionKind,
    pub branch: BranchMatch,
    /// Usernames exempt (for `push`: those who may push).
    pub users: Vec<String>,
    /// Approvals or passing builds required, for the kinds that take one.
    pub value: Option<u32>,
}

impl BranchRestriction {
    /// Checks what a stored restriction must satisfy.
    pub fn validate(&self) -> Result<(), String> {
        match &self.branch {
            BranchMatch::Glob(p) if p.is_empty() || p.len() > MAX_PATTERN_LEN => {
                return Err(format!("pattern must be 1-{MAX_PATTERN_LEN} bytes"))
            }
            BranchMatch::Glob(p) if p.chars().any(char::is_control) => {
                return Err("pattern must not hold control characters".into())
            }
            BranchMatch::BranchingModel(t) if !BRANCH_TYPES.contains(&t.as_str()) => {
                return Err(format!(
                    "branch_type must be one of {}",
                    BRANCH_TYPES.join(", ")
                ))
            }
            _ => {}
        }
        if self.users.len() > MAX_USERS {
            return Err(format!("at most {MAX_USERS} users"));
        }
        if self.kind.takes_value() && self.value.is_none() {
            return Err(format!("{} needs a value", self.kind.as_str()));
        }
        Ok(())
    }

    /// Whether it covers `branch` (a short name, `main`) in a repository
    /// whose main branch is `main_branch`.
    pub fn matches(&self, branch: &str, main_branch: &str) -> bool {
        match &self.branch {
            BranchMatch::Glob(p) => glob(p.as_bytes(), branch.as_bytes()),
            BranchMatch::BranchingModel(t) => match t.as_str() {
                "development" => branch == main_branch,
                "production" => false,
                prefix => branch
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
            },
        }
    }
}

/// `*` and `?` matching, iterative with one backtrack point (linear in
/// practice, never exponential).
pub fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// What a ref update does, as restrictions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Create,
    FastForward,
    /// Rewrites history: the old tip is not an ancestor of the new one.
    Force,
    Delete,
}

/// The `ng` reason for `update` of `refname` by `actor` (a username, or
/// empty / `token:…` for credentials that are not a user), or `None` if no
/// restriction refuses it. Only branches (`refs/heads/`) are restricted.
pub fn refusal(
    restrictions: &[BranchRestriction],
    refname: &str,
    main_branch: &str,
    actor: &str,
    update: Update,
) -> Option<String> {
    let branch = refname.strip_prefix("refs/heads/")?;
    let main = main_branch
        .strip_prefix("refs/heads/")
        .unwrap_or(main_branch);
    let exempt = |r: &BranchRestriction| r.users.iter().any(|u| u.eq_ignore_ascii_case(actor));
    for r in restrictions.iter().filter(|r| r.matches(branch, main)) {
        match (r.kind, update) {
            // git's own wording (receive.denyDeletes, denyNonFastForwards).
            (RestrictionKind::Delete, Update::Delete) => return Some("deletion prohibited".into()),
            (RestrictionKind::Force, Update::Force) => return Some("non-fast-forward".into()),
            (RestrictionKind::Push, _) if !exempt(r) => {
                return Some(format!(
                    "pushes to {branch} are restricted by a branch restriction"
                ))
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(kind: RestrictionKind, branch: BranchMatch, users: &[&str]) -> BranchRestriction {
        BranchRestriction {
            id: 1,
            kind,
            branch,
            users: users.iter().map(|s| s.to_string()).collect(),
            value: None,
        }
    }

    #[test]
    fn globs() {
        for (p, n, ok) in [
            ("main", "main", true),
            ("main", "mainx", false),
            ("release/*", "release/1.0", true),
            ("release/*", "release", false),
            ("*", "a/b/c", true),
            ("r?l*e", "rule", true),
            ("r?l*e", "rul", false),
            ("r?l*e", "rolle", true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ] {
            assert_eq!(glob(p.as_bytes(), n.as_bytes()), ok, "{p} {n}");
        }
    }

    #[test]
    fn push_force_and_delete_refusals_in_gits_words() {
        let rs = vec![
            r(
                RestrictionKind::Force,
                BranchMatch::Glob("main".into()),
                &[],
            ),
            r(
                RestrictionKind::Delete,
                BranchMatch::BranchingModel("development".into()),
                &[],
            ),
            r(
                RestrictionKind::Push,
                BranchMatch::Glob("release/*".into()),
                &["alice"],
            ),
        ];
        let f = |name: &str, actor: &str, u| refusal(&rs, name, "refs/heads/main", actor, u);
        assert_eq!(
            f("refs/heads/main", "bob", Update::Force).as_deref(),
            Some("non-fast-forward")
        );
        assert_eq!(
            f("refs/heads/main", "bob", Update::Delete).as_deref(),
            Some("deletion prohibited")
        );
        assert_eq!(f("refs/heads/main", "bob", Update::FastForward), None);
        assert_eq!(f("refs/heads/other", "bob", Update::Force), None);
        assert_eq!(f("refs/tags/main", "bob", Update::Delete), None);
        assert!(f("refs/heads/release/2", "bob", Update::Create).is_some());
        assert_eq!(f("refs/heads/release/2", "Alice", Update::Create), None);
        assert!(f("refs/heads/release/2", "token:cnr_1", Update::FastForward).is_some());
    }
}
