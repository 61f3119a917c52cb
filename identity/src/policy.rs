//! The authorization decision, in one place for every entry point (git
//! over HTTP and SSH, REST, the web interface).
//!
//! Two rules shape it. A private repository must be indistinguishable
//! from a missing one to anyone who cannot read it: both are "not found"
//! (or, for an anonymous caller, "authenticate"). And a credential's
//! scopes only ever narrow what its principal may do: the access level is
//! decided first, without scopes, so a missing scope is reported only to
//! a caller who could already see the repository.

use crate::model::{has_scope, Index, Level, Scope, TokenOwner};

/// Who is calling, once their credential is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// The holder of a router's configured operator token: administers
    /// everything (a break-glass credential for clusters without users).
    Operator,
    /// A user; `scopes` is `None` for a credential that is not scoped
    /// (none yet: web sessions will be).
    User {
        username: String,
        scopes: Option<Vec<Scope>>,
        token: Option<String>,
    },
    Repository {
        workspace: String,
        slug: String,
        scopes: Vec<Scope>,
        token: String,
    },
    Workspace {
        workspace: String,
        scopes: Vec<Scope>,
        token: String,
    },
}

impl Principal {
    /// The acting identity recorded in log entries, events and the audit
    /// log: a username, `token:<id>` for access tokens, or empty.
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => String::new(),
            Principal::Operator => "operator".into(),
            Principal::User { username, .. } => username.clone(),
            Principal::Repository { token, .. } | Principal::Workspace { token, .. } => {
                format!("token:{token}")
            }
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Principal::Anonymous)
    }

    pub fn username(&self) -> Option<&str> {
        match self {
            Principal::User { username, .. } => Some(username),
            _ => None,
        }
    }

    fn scopes(&self) -> Option<&[Scope]> {
        match self {
            Principal::Anonymous => Some(&[]),
            Principal::Operator => None,
            Principal::User { scopes, .. } => scopes.as_deref(),
            Principal::Repository { scopes, .. } | Principal::Workspace { scopes, .. } => {
                Some(scopes)
            }
        }
    }

    /// Whether the credential carries `scope` (unscoped ones carry all).
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes().is_none_or(|s| has_scope(s, scope))
    }

    /// The principal a token stands for.
    pub fn of_token(owner: &TokenOwner, scopes: &[Scope], id: &str) -> Principal {
        match owner {
            TokenOwner::User(u) => Principal::User {
                username: u.clone(),
                scopes: Some(scopes.to_vec()),
                token: Some(id.to_owned()),
            },
            TokenOwner::Repository { workspace, slug } => Principal::Repository {
                workspace: workspace.clone(),
                slug: slug.clone(),
                scopes: scopes.to_vec(),
                token: id.to_owned(),
            },
            TokenOwner::Workspace(w) => Principal::Workspace {
                workspace: w.clone(),
                scopes: scopes.to_vec(),
                token: id.to_owned(),
            },
        }
    }
}

/// A repository as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct RepoRef<'a> {
    pub workspace: &'a str,
    pub slug: &'a str,
    pub is_private: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Clone, fetch, browse.
    Read,
    /// Push, create and delete branches and tags.
    Write,
    /// Settings, visibility, permissions, branch restrictions.
    Admin,
    /// Delete the repository.
    Delete,
}

impl Action {
    fn level(self) -> Level {
        match self {
            Action::Read => Level::Read,
            Action::Write => Level::Write,
            Action::Admin | Action::Delete => Level::Admin,
        }
    }

    fn scope(self) -> Scope {
        match self {
            Action::Read => Scope::Repository,
            Action::Write => Scope::RepositoryWrite,
            Action::Admin => Scope::RepositoryAdmin,
            Action::Delete => Scope::RepositoryDelete,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Missing, or private and unreadable: the same answer either way.
    NotFound,
    /// Anonymous where a credential could help: ask for one.
    Unauthorized,
    /// The caller can see the repository but may not do this.
    Forbidden(String),
}

/// Bitbucket's wording for a credential without the scope a call needs.
pub const MISSING_SCOPE: &str = "Your credentials lack one or more required privilege scopes.";

/// The access `principal` has to `repo`, scopes aside (scopes of access
/// tokens do say which level they were given).
pub fn access(index: &Index, principal: &Principal, repo: RepoRef<'_>) -> Option<Level> {
    let ws = repo.workspace.to_ascii_lowercase();
    let slug = repo.slug.to_ascii_lowercase();
    let public = (!repo.is_private).then_some(Level::Read);
    let granted = match principal {
        Principal::Anonymous => None,
        Principal::Operator => Some(Level::Admin),
        Principal::User { username, .. } => user_access(index, username, &ws, &slug),
        Principal::Repository {
            workspace,
            slug: s,
            scopes,
            ..
        } => (*workspace == ws && *s == slug)
            .then(|| token_level(scopes))
            .flatten(),
        Principal::Workspace {
            workspace, scopes, ..
        } => (*workspace == ws).then(|| token_level(scopes)).flatten(),
    };
    granted.max(public)
}

/// What an access token's scopes make of it on its own repositories.
fn token_level(scopes: &[Scope]) -> Option<Level> {
    if has_scope(scopes, Scope::RepositoryAdmin) {
        Some(Level::Admin)
    } else if has_scope(scopes, Scope::RepositoryWrite) {
        Some(Level::Write)
    } else if has_scope(scopes, Scope::Repository) {
        Some(Level::Read)
    } else {
        None
    }
}

fn user_access(index: &Index, username: &str, ws: &str, slug: &str) -> Option<Level> {
    let user = index.user(username)?;
    if user.site_admin {
        return Some(Level::Admin);
    }
    let by_role = index.role(&user.username, ws).and_then(|r| r.level());
    let by_grant = index
        .grants
        .get(&user.username)
        .into_iter()
        .flatten()
        .filter(|g| match &g.target {
            crate::model::Target::Workspace(w) => w == ws,
            crate::model::Target::Repository { workspace, slug: s } => workspace == ws && s == slug,
        })
        .map(|g| g.level)
        .max();
    by_role.max(by_grant)
}

/// May `principal` do `action` on `repo` (`None`: no such repository)?
pub fn decide(
    index: &Index,
    principal: &Principal,
    repo: Option<RepoRef<'_>>,
    action: Action,
) -> Decision {
    let hidden = if principal.is_anonymous() {
        Decision::Unauthorized
    } else {
        Decision::NotFound
    };
    let Some(repo) = repo else {
        return hidden;
    };
    let Some(level) = access(index, principal, repo) else {
        return hidden;
    };
    // Reading what anyone may read needs no scope.
    if action == Action::Read && !repo.is_private {
        return Decision::Allow;
    }
    if level < action.level() {
        if principal.is_anonymous() {
            return Decision::Unauthorized;
        }
        return Decision::Forbidden(format!(
            "You need {} access to {}/{} to do this.",
            action.level().as_str(),
            repo.workspace,
            repo.slug
        ));
    }
    if !principal.has_scope(action.scope()) {
        return Decision::Forbidden(MISSING_SCOPE.to_owned());
    }
    Decision::Allow
}

/// May `principal` create repositories in `workspace` (`exists`: the
/// workspace is known)? Site administrators may create workspaces;
/// owners and members create repositories in theirs, as do users granted
/// write or admin on the whole workspace, and workspace access tokens
/// with `repository:admin`.
pub fn may_create_repository(
    index: &Index,
    principal: &Principal,
    workspace: &str,
    exists: bool,
) -> Decision {
    let ws = workspace.to_ascii_lowercase();
    let allowed = match principal {
        Principal::Anonymous => return Decision::Unauthorized,
        Principal::Operator => true,
        Principal::User { username, .. } => index.user(username).is_some_and(|u| {
            u.site_admin
                || (exists
                    && (matches!(
                        index.role(&u.username, &ws),
                        Some(crate::model::Role::Owner | crate::model::Role::Member)
                    ) || index
                        .grants
                        .get(&u.username)
                        .into_iter()
                        .flatten()
                        .any(|g| {
                            g.target == crate::model::Target::Workspace(ws.clone())
                                && g.level >= Level::Write
                        })))
        }),
        Principal::Workspace { workspace: w, .. } => exists && *w == ws,
        Principal::Repository { .. } => false,
    };
    if !allowed {
        return Decision::Forbidden(format!(
            "You may not create repositories in workspace {workspace}."
        ));
    }
    if !principal.has_scope(Scope::RepositoryAdmin) {
        return Decision::Forbidden(MISSING_SCOPE.to_owned());
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Grant, Membership, Role, Snapshot, Target, User};

    fn user(name: &str, admin: bool) -> User {
        User {
            uuid: format!("{{{name}}}"),
            username: name.into(),
            display_name: name.into(),
            email: String::new(),
            site_admin: admin,
            password_hash: None,
            created_at: 0,
        }
    }

    fn index() -> Index {
        Index::new(Snapshot {
            users: ["root", "reader", "writer", "owner", "member", "nobody"]
                .iter()
                .map(|n| user(n, *n == "root"))
                .collect(),
            grants: vec![
                Grant {
                    user: "reader".into(),
                    target: Target::parse("ws/priv").expect("target"),
                    level: Level::Read,
                },
                Grant {
                    user: "writer".into(),
                    target: Target::parse("ws").expect("target"),
                    level: Level::Write,
                },
            ],
            memberships: vec![
                Membership {
                    workspace: "ws".into(),
                    user: "owner".into(),
                    role: Role::Owner,
                },
                Membership {
                    workspace: "ws".into(),
                    user: "member".into(),
                    role: Role::Member,
                },
            ],
            ..Snapshot::default()
        })
    }

    fn as_user(name: &str, scopes: Option<Vec<Scope>>) -> Principal {
        Principal::User {
            username: name.into(),
            scopes,
            token: None,
        }
    }

    const PRIV: RepoRef<'static> = RepoRef {
        workspace: "ws",
        slug: "priv",
        is_private: true,
    };
    const PUB: RepoRef<'static> = RepoRef {
        workspace: "WS",
        slug: "Pub",
        is_private: false,
    };

    #[test]
    fn private_is_missing_to_whoever_cannot_read() {
        let ix = index();
        for p in [as_user("nobody", None), as_user("ghost", None)] {
            for a in [Action::Read, Action::Write, Action::Admin, Action::Delete] {
                assert_eq!(decide(&ix, &p, Some(PRIV), a), Decision::NotFound);
                assert_eq!(decide(&ix, &p, None, a), Decision::NotFound);
            }
        }
        let anon = Principal::Anonymous;
        assert_eq!(
            decide(&ix, &anon, Some(PRIV), Action::Read),
            decide(&ix, &anon, None, Action::Read)
        );
        assert_eq!(decide(&ix, &anon, Some(PUB), Action::Read), Decision::Allow);
        assert_eq!(
            decide(&ix, &anon, Some(PUB), Action::Write),
            Decision::Unauthorized
        );
    }

    #[test]
    fn levels_come_from_grants_roles_and_site_admin() {
        let ix = index();
        let d = |name: &str, a| decide(&ix, &as_user(name, None), Some(PRIV), a);
        assert_eq!(d("reader", Action::Read), Decision::Allow);
        assert!(matches!(d("reader", Action::Write), Decision::Forbidden(_)));
        assert_eq!(d("writer", Action::Write), Decision::Allow);
        assert!(matches!(d("writer", Action::Admin), Decision::Forbidden(_)));
        assert_eq!(d("member", Action::Read), Decision::Allow);
        assert!(matches!(d("member", Action::Write), Decision::Forbidden(_)));
        assert_eq!(d("owner", Action::Delete), Decision::Allow);
        assert_eq!(d("root", Action::Delete), Decision::Allow);
    }

    #[test]
    fn scopes_narrow_but_never_reveal() {
        let ix = index();
        let only_account = Some(vec![Scope::Account]);
        assert_eq!(
            decide(
                &ix,
                &as_user("writer", only_account.clone()),
                Some(PRIV),
                Action::Read
            ),
            Decision::Forbidden(MISSING_SCOPE.into())
        );
        assert_eq!(
            decide(
                &ix,
                &as_user("nobody", only_account),
                Some(PRIV),
                Action::Read
            ),
            Decision::NotFound
        );
        let write = Some(vec![Scope::RepositoryWrite]);
        assert_eq!(
            decide(
                &ix,
                &as_user("writer", write.clone()),
                Some(PRIV),
                Action::Read
            ),
            Decision::Allow
        );
        assert_eq!(
            decide(&ix, &as_user("root", write), Some(PRIV), Action::Delete),
            Decision::Forbidden(MISSING_SCOPE.into())
        );
    }

    #[test]
    fn access_tokens_stay_on_their_repositories() {
        let ix = index();
        let repo_token = Principal::Repository {
            workspace: "ws".into(),
            slug: "priv".into(),
            scopes: vec![Scope::RepositoryWrite],
            token: "cnr_1".into(),
        };
        assert_eq!(
            decide(&ix, &repo_token, Some(PRIV), Action::Write),
            Decision::Allow
        );
        assert!(matches!(
            decide(&ix, &repo_token, Some(PRIV), Action::Admin),
            Decision::Forbidden(_)
        ));
        let other = RepoRef {
            slug: "other",
            ..PRIV
        };
        assert_eq!(
            decide(&ix, &repo_token, Some(other), Action::Read),
            Decision::NotFound
        );
        let ws_token = Principal::Workspace {
            workspace: "ws".into(),
            scopes: vec![Scope::Repository],
            token: "cnw_1".into(),
        };
        assert_eq!(
            decide(&ix, &ws_token, Some(other), Action::Read),
            Decision::Allow
        );
        let elsewhere = RepoRef {
            workspace: "ws2",
            ..PRIV
        };
        assert_eq!(
            decide(&ix, &ws_token, Some(elsewhere), Action::Read),
            Decision::NotFound
        );
        assert_eq!(
            may_create_repository(&ix, &ws_token, "ws", true),
            Decision::Forbidden(MISSING_SCOPE.into())
        );
    }

    #[test]
    fn who_creates_repositories() {
        let ix = index();
        let yes = |n: &str, exists| {
            may_create_repository(&ix, &as_user(n, None), "ws", exists) == Decision::Allow
        };
        assert!(yes("root", false) && yes("owner", true) && yes("member", true));
        assert!(yes("writer", true) && !yes("reader", true) && !yes("owner", false));
        assert_eq!(
            may_create_repository(&ix, &Principal::Anonymous, "ws", true),
            Decision::Unauthorized
        );
    }
}
