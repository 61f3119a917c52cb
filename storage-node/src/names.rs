//! Names of workspaces and repositories: which are valid, the one canonical
//! form they are stored and compared in, and how names stored before that
//! rule (legacy names) move to it.
//!
//! Workspace ids and repository slugs are unique without regard to case,
//! as on Bitbucket: `Case1` and `case1` are one repository. The canonical
//! form is the ASCII lower case (valid names are ASCII). New rows are keyed
//! by it; a lookup tries the name as given first, then its canonical form,
//! so rows keyed by a legacy name that clashes with another (and so could
//! not be moved) stay reachable by their exact name until an operator
//! deletes one of them. Nothing is ever merged.

use std::collections::BTreeMap;

/// Longest workspace id or repository slug, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest repository description, in bytes.
pub use cairn_proto::limits::MAX_DESCRIPTION_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid {what} {value:?}: use 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'")]
    Invalid { what: &'static str, value: String },
    #[error("{what} is {len} bytes long; the limit is {limit}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
}

/// Workspace and slug rules: what is safe in a URL path and a file name.
pub fn validate(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && !value.starts_with('.')
        // Case-sensitive on purpose: replicas apply logged creates with this
        // rule, so it must not change; callers validate the canonical form.
        && !value.ends_with(".git")
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            what,
            value: value.to_owned(),
        })
    }
}

/// Free text stored with a repository.
pub fn validate_description(description: &str) -> Result<(), NameError> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(NameError::TooLong {
            what: "description",
            len: description.len(),
            limit: MAX_DESCRIPTION_BYTES,
        });
    }
    Ok(())
}

/// The form a name is stored and compared in.
pub fn canonical(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// `name` as given, then its canonical form if that differs: the order in
/// which lookups try stored keys.
pub fn lookup_forms(name: &str) -> impl Iterator<Item = String> {
    let canon = canonical(name);
    let exact = (canon != name).then(|| name.to_owned());
    exact.into_iter().chain(std::iter::once(canon))
}

/// What moving a set of stored names to their canonical form takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CasePlan {
    /// `(stored, canonical)`: names alone in their canonical form, stored
    /// otherwise; the row moves to the canonical key.
    pub renames: Vec<(String, String)>,
    /// Names that differ only in case, sorted, by canonical form. Their
    /// rows stay where they are.
    pub clashes: BTreeMap<String, Vec<String>>,
}

impl CasePlan {
    pub fn is_empty(&self) -> bool {
        self.renames.is_empty() && self.clashes.is_empty()
    }
}

/// Groups stored names by canonical form: a lone legacy name is renamed,
/// several names of one form are a clash left for an operator.
pub fn plan_case_migration<I, S>(stored: I) -> CasePlan
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in stored {
        let name = name.into();
        groups.entry(canonical(&name)).or_default().push(name);
    }
    let mut plan = CasePlan::default();
    for (canon, mut names) in groups {
        if names.len() > 1 {
            names.sort();
            plan.clashes.insert(canon, names);
        } else if names[0] != canon {
            plan.renames.push((names.remove(0), canon));
        }
    }
    plan
}

/// What a replica's state holds of legacy names: whether a
/// `CanonicalizeNames` entry would change anything, and the clashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseStatus {
    pub pending: bool,
    /// `(what, names)`: "workspace" or "repository", and the clashing names.
    pub clashes: Vec<(&'static str, Vec<String>)>,
}

impl CaseStatus {
    /// Adds the part of one family of rows: `stored` names and the clash
    /// markers (by canonical form) the state records for them.
    pub fn add(&mut self, what: &'static str, stored: Vec<String>, recorded: Option<Vec<String>>) {
        let plan = plan_case_migration(stored);
        self.pending |= !plan.renames.is_empty();
        if let Some(recorded) = recorded {
            let expected: Vec<String> = plan.clashes.keys().cloned().collect();
            self.pending |= recorded != expected;
        }
        self.clashes
            .extend(plan.clashes.into_values().map(|names| (what, names)));
    }
}

/// The operator-facing report of one clash: what it is and what to do.
pub fn describe_clash(what: &str, names: &[String]) -> String {
    let first = names.first().map(String::as_str).unwrap_or_default();
    format!(
        "{what}s {} differ only in case; Cairn compares names without case. Each stays \
         reachable by its exact name, and no {what} of that name can be created, until all \
         but one are deleted (e.g. `cairn admin repo delete {first}` after moving its content \
         with `git clone --mirror` and `git push --mirror` to a new name); the last one then \
         takes the canonical name {:?}",
        names.join(", "),
        canonical(first),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        for (name, ok) in [
            ("alpha", true),
            ("Alpha-1_x.y", true),
            (&"a".repeat(64) as &str, true),
            (&"a".repeat(65), false),
            ("", false),
            (".hidden", false),
            ("repo.git", false),
            ("repo.GIT", true),
            ("a/b", false),
            ("a b", false),
            ("ünï", false),
        ] {
            assert_eq!(validate("slug", name).is_ok(), ok, "{name:?}");
        }
        assert!(validate_description(&"d".repeat(MAX_DESCRIPTION_BYTES)).is_ok());
        assert_eq!(
            validate_description(&"d".repeat(MAX_DESCRIPTION_BYTES + 1)),
            Err(NameError::TooLong {
                what: "description",
                len: MAX_DESCRIPTION_BYTES + 1,
                limit: MAX_DESCRIPTION_BYTES
            })
        );
    }

    #[test]
    fn lookups_try_the_exact_name_first() {
        assert_eq!(lookup_forms("case1").collect::<Vec<_>>(), ["case1"]);
        assert_eq!(
            lookup_forms("Case1").collect::<Vec<_>>(),
            ["Case1", "case1"]
        );
    }

    #[test]
    fn migration_plan_table() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Nothing to do for canonical names.
        assert!(plan_case_migration(["a/b", "c/d"]).is_empty());
        // A lone legacy name moves.
        let plan = plan_case_migration(["ws/Repo", "ws/other"]);
        assert_eq!(plan.renames, vec![("ws/Repo".into(), "ws/repo".into())]);
        assert!(plan.clashes.is_empty());
        // Names of one canonical form clash, whichever is canonical.
        let plan = plan_case_migration(["ws/Case1", "ws/case1", "Sec", "SEC", "x"]);
        assert!(plan.renames.is_empty());
        assert_eq!(
            plan.clashes,
            BTreeMap::from([
                ("sec".to_owned(), s(&["SEC", "Sec"])),
                ("ws/case1".to_owned(), s(&["ws/Case1", "ws/case1"])),
            ])
        );
        // Planning the outcome of a plan again yields nothing but the clashes.
        let after: Vec<String> = ["ws/Repo", "ws/other", "A", "a"]
            .into_iter()
            .map(|n| {
                plan_case_migration(["ws/Repo", "ws/other", "A", "a"])
                    .renames
                    .into_iter()
                    .find(|(from, _)| from == n)
                    .map(|(_, to)| to)
                    .unwrap_or_else(|| n.to_owned())
            })
            .collect();
        let again = plan_case_migration(after);
        assert!(again.renames.is_empty());
        assert_eq!(again.clashes.len(), 1);
    }

    #[test]
    fn clash_report_says_what_to_do() {
        let text = describe_clash("repository", &["ws/Case1".into(), "ws/case1".into()]);
        assert!(
            text.contains("ws/Case1, ws/case1 differ only in case"),
            "{text}"
        );
        assert!(text.contains("cairn admin repo delete ws/Case1"), "{text}");
    }
}
