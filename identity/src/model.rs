//! The identity rows the meta group keeps, and the snapshot routers cache.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A random (v4) uuid in braces, as Bitbucket writes them:
/// `{xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx}`.
pub fn new_uuid() -> String {
    let h = crate::token::hex(&crate::token::random_bytes::<16>());
    format!(
        "{{{}-{}-4{}-8{}-{}}}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Repository permission, ordered: each level includes the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }
}

/// A user's place in a workspace. Owners administer every repository of
/// it; members read every one and may create repositories; collaborators
/// see only what they are granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Member,
    Collaborator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
            Role::Collaborator => "collaborator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "member" => Some(Role::Member),
            "collaborator" => Some(Role::Collaborator),
            _ => None,
        }
    }

    /// What the role alone gives on every repository of the workspace.
    pub fn level(self) -> Option<Level> {
        match self {
            Role::Owner => Some(Level::Admin),
            Role::Member => Some(Level::Read),
            Role::Collaborator => None,
        }
    }
}

/// Bitbucket Cloud's OAuth / API token scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "repository")]
    Repository,
    #[serde(rename = "repository:write")]
    RepositoryWrite,
    #[serde(rename = "repository:admin")]
    RepositoryAdmin,
    #[serde(rename = "repository:delete")]
    RepositoryDelete,
    #[serde(rename = "pullrequest")]
    PullRequest,
    #[serde(rename = "pullrequest:write")]
    PullRequestWrite,
    #[serde(rename = "pipeline")]
    Pipeline,
    #[serde(rename = "webhook")]
    Webhook,
    #[serde(rename = "account")]
    Account,
}

impl Scope {
    pub const ALL: [Scope; 9] = [
        Scope::Repository,
        Scope::RepositoryWrite,
        Scope::RepositoryAdmin,
        Scope::RepositoryDelete,
        Scope::PullRequest,
        Scope::PullRequestWrite,
        Scope::Pipeline,
        Scope::Webhook,
        Scope::Account,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Repository => "repository",
            Scope::RepositoryWrite => "repository:write",
            Scope::RepositoryAdmin => "repository:admin",
            Scope::RepositoryDelete => "repository:delete",
            Scope::PullRequest => "pullrequest",
            Scope::PullRequestWrite => "pullrequest:write",
            Scope::Pipeline => "pipeline",
            Scope::Webhook => "webhook",
            Scope::Account => "account",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// The scopes this one includes, as Bitbucket documents them: a write
    /// or admin scope includes reading the same things.
    pub fn implies(self, other: Scope) -> bool {
        self == other
            || matches!(
                (self, other),
                (
                    Scope::RepositoryWrite | Scope::RepositoryAdmin,
                    Scope::Repository
                ) | (Scope::PullRequestWrite, Scope::PullRequest)
                    | (
                        Scope::PullRequestWrite | Scope::PullRequest,
                        Scope::Repository
                    )
            )
    }
}

/// A set of scopes a credential carries.
pub fn has_scope(scopes: &[Scope], needed: Scope) -> bool {
    scopes.iter().any(|s| s.implies(needed))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `{xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx}`, as Bitbucket writes uuids.
    pub uuid: String,
    /// Canonical (lower case); unique.
    pub username: String,
    pub display_name: String,
    pub email: String,
    /// Administers the whole installation: every workspace and repository.
    pub site_admin: bool,
    /// Argon2id PHC string; never leaves the meta group (see
    /// [`Snapshot`]).
    #[serde(default)]
    pub password_hash: Option<String>,
    pub created_at: i64,
}

/// What a grant or a membership names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Workspace(String),
    Repository { workspace: String, slug: String },
}

impl Target {
    /// `WS` or `WS/SLUG`, compared without case.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim_end_matches(".git");
        match s.split_once('/') {
            None if !s.is_empty() => Some(Target::Workspace(s.to_ascii_lowercase())),
            Some((w, r)) if !w.is_empty() && !r.is_empty() && !r.contains('/') => {
                Some(Target::Repository {
                    workspace: w.to_ascii_lowercase(),
                    slug: r.to_ascii_lowercase(),
                })
            }
            _ => None,
        }
    }

    pub fn workspace(&self) -> &str {
        match self {
            Target::Workspace(w) | Target::Repository { workspace: w, .. } => w,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Workspace(w) => f.write_str(w),
            Target::Repository { workspace, slug } => write!(f, "{workspace}/{slug}"),
        }
    }
}

/// A permission given to a user on a workspace (all its repositories) or
/// one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub user: String,
    pub target: Target,
    pub level: Level,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub workspace: String,
    pub user: String,
    pub role: Role,
}

/// Whom a token acts for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOwner {
    /// A personal API token (app password): acts as the user, within its
    /// scopes.
    User(String),
    /// A repository access token: that repository only.
    Repository { workspace: String, slug: String },
    /// A workspace access token: the workspace's repositories only.
    Workspace(String),
}

impl TokenOwner {
    /// The kind (and so the prefix) of this owner's tokens.
    pub fn token_kind(&self) -> crate::token::Kind {
        match self {
            TokenOwner::User(_) => crate::token::Kind::Personal,
            TokenOwner::Repository { .. } => crate::token::Kind::Repository,
            TokenOwner::Workspace(_) => crate::token::Kind::Workspace,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TokenOwner::User(u) => format!("user {u}"),
            TokenOwner::Repository { workspace, slug } => {
                format!("repository {workspace}/{slug}")
            }
            TokenOwner::Workspace(w) => format!("workspace {w}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// 16 hex digits with the kind's prefix: `cnp_0123456789abcdef`.
    pub id: String,
    pub owner: TokenOwner,
    pub label: String,
    pub scopes: Vec<Scope>,
    /// Hex HMAC-SHA-256 of the secret under the cluster's token key.
    pub hash: String,
    pub created_at: i64,
    pub created_by: String,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub revoked_at: Option<i64>,
    #[serde(default)]
    pub last_used: Option<i64>,
}

impl TokenRecord {
    /// Neither revoked nor expired at `now` (seconds).
    pub fn is_live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// An SSH public key: a user's (read and write as the user) or a
/// repository's deploy key (read only, that repository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKey {
    /// `{…}`: names the key in REST paths.
    pub uuid: String,
    /// `SHA256:` fingerprint of the key blob, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub owner: KeyOwner,
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, …
    pub algorithm: String,
    /// Base64 key blob, as in `authorized_keys`.
    pub key: String,
    /// The comment after the key, as pasted.
    pub comment: String,
    pub label: String,
    pub created_at: i64,
    #[serde(default)]
    pub last_used: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOwner {
    User(String),
    Deploy { workspace: String, slug: String },
}

/// Everything a router needs to authenticate and authorize, as of one
/// meta version. Password hashes are left out: sign-in checks them on a
/// meta replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Grows with every identity change; a router polls it.
    pub version: u64,
    /// Hex key of the token hash; empty until the first token.
    pub token_key: String,
    pub users: Vec<User>,
    pub grants: Vec<Grant>,
    pub memberships: Vec<Membership>,
    pub tokens: Vec<TokenRecord>,
    pub ssh_keys: Vec<SshKey>,
}

/// A [`Snapshot`] indexed for lookups on every request.
#[derive(Debug, Default)]
pub struct Index {
    pub version: u64,
    pub token_key: Vec<u8>,
    pub users: HashMap<String, User>,
    pub tokens: HashMap<String, TokenRecord>,
    /// By user: their grants.
    pub grants: HashMap<String, Vec<Grant>>,
    /// By user: workspace → role.
    pub roles: HashMap<String, HashMap<String, Role>>,
    pub ssh_keys: HashMap<String, SshKey>,
}

impl Index {
    pub fn new(s: Snapshot) -> Index {
        let mut index = Index {
            version: s.version,
            token_key: crate::token::decode_hex(&s.token_key).unwrap_or_default(),
            ..Index::default()
        };
        for u in s.users {
            index.users.insert(u.username.clone(), u);
        }
        for t in s.tokens {
            index.tokens.insert(t.id.clone(), t);
        }
        for g in s.grants {
            index.grants.entry(g.user.clone()).or_default().push(g);
        }
        for m in s.memberships {
            index
                .roles
                .entry(m.user.clone())
                .or_default()
                .insert(m.workspace, m.role);
        }
        for k in s.ssh_keys {
            index.ssh_keys.insert(k.fingerprint.clone(), k);
        }
        index
    }

    pub fn user(&self, username: &str) -> Option<&User> {
        self.users.get(&username.to_ascii_lowercase())
    }

    /// A user's role in `workspace`.
    pub fn role(&self, user: &str, workspace: &str) -> Option<Role> {
        self.roles
            .get(user)
            .and_then(|r| r.get(&workspace.to_ascii_lowercase()))
            .copied()
    }

    /// The workspaces a user belongs to or holds grants in.
    pub fn workspaces_of(&self, user: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .roles
            .get(user)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(gs) = self.grants.get(user) {
            out.extend(gs.iter().map(|g| g.target.workspace().to_owned()));
        }
        out.sort();
        out.dedup();
        out
    }
}
