//! `cairn user|token|perm|ssh-key|audit`: users, credentials and permissions in the
//! cluster directory, through any storage node's `Identity` service.
//!
//! Secrets are made here and shown once: a token is generated locally and
//! only its keyed hash is sent; a password is hashed (Argon2id) before it
//! leaves this process.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cairn_client::{follow_leader, Attempt, NodePool, RetryPolicy};
use cairn_identity::change::{AuditEvent, Change, Outcome, Request};
use cairn_identity::token;
use cairn_identity::{
    Level, Role, Scope, Snapshot, Target as PermTarget, TokenOwner, TokenRecord, User,
};
use cairn_proto::identity::identity_client::IdentityClient;
use cairn_proto::identity::{AuditRequest, ChangeRequest, SnapshotRequest};
use clap::{Args, Subcommand};

use crate::cluster::{node_urls, Target};

/// Who the CLI's changes are recorded as, until operators authenticate.
const ACTOR: &str = "operator";

#[derive(Args)]
pub struct UserArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Add {
        username: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long, default_value = "")]
        email: String,
        /// Administers every workspace and repository.
        #[arg(long)]
        admin: bool,
        /// Read a web sign-in password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
}

#[derive(Args)]
pub struct TokenArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (once) on standard output: a user's
    /// API token, or an access token of one repository or workspace.
    Create {
        #[arg(long, group = "owner")]
        user: Option<String>,
        /// WORKSPACE/REPO
        #[arg(long, group = "owner")]
        repository: Option<String>,
        #[arg(long, group = "owner")]
        workspace: Option<String>,
        /// A scope (repeat for more); all scopes when none is given.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Seconds until the token expires; never without.
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token, given whole or by its id (`cnp_…`).
    Revoke { token: String },
}

#[derive(Args)]
pub struct PermArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: PermCommand,
}

#[derive(Subcommand)]
enum PermCommand {
    /// Give USER LEVEL (read, write, admin) on TARGET (WS or WS/REPO).
    Grant {
        user: String,
        target: String,
        level: String,
    },
    /// Take USER's permission on TARGET away.
    Revoke { user: String, target: String },
    /// Set USER's role in WORKSPACE: owner, member, collaborator or none.
    Role {
        workspace: String,
        user: String,
        role: String,
    },
    /// List permissions and roles.
    List,
}

#[derive(Args)]
pub struct SshKeyArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: SshKeyCommand,
}

#[derive(Subcommand)]
enum SshKeyCommand {
    /// Add USER's public key from FILE (`-`: standard input), e.g.
    /// ~/.ssh/id_ed25519.pub.
    Add {
        user: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List USER's keys.
    List { user: String },
    /// Remove a key by its fingerprint (`SHA256:…`).
    Remove { fingerprint: String },
}

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print audit records: who did what, when, from where.
    Tail {
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new records.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
}

/// The cluster's `Identity` service, over any node.
pub(crate) struct Directory {
    urls: Vec<String>,
    pool: NodePool,
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Directory {
    pub(crate) fn new(urls: Vec<String>) -> Self {
        Directory {
            urls,
            pool: NodePool::default(),
        }
    }

    fn of(target: &Target) -> Result<Self> {
        Ok(Self::new(node_urls(target)?))
    }

    pub(crate) async fn snapshot(&self) -> Result<Snapshot> {
        let (r, _) = follow_leader(
            &self.pool,
            &RetryPolicy::default(),
            &self.urls,
            |ch| async move {
                Ok(IdentityClient::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .snapshot(SnapshotRequest { known_version: 0 })
                    .await?)
            },
        )
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        serde_json::from_slice(&r.into_inner().snapshot_json).context("decoding the snapshot")
    }

    pub(crate) async fn change(&self, change: Change) -> Result<Outcome> {
        let body = serde_json::to_vec(&Request {
            actor: ACTOR.into(),
            from: String::new(),
            at: now(),
            change,
        })?;
        let (r, _) = follow_leader(&self.pool, &RetryPolicy::default(), &self.urls, |ch| {
            let req = ChangeRequest {
                request_json: body.clone().into(),
            };
            async move {
                IdentityClient::new(ch)
                    .change(req)
                    .await
                    .map_err(Attempt::mutation)
            }
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        serde_json::from_slice(&r.into_inner().outcome_json).context("decoding the outcome")
    }

    /// The cluster's token key, made on first use.
    async fn token_key(&self) -> Result<Vec<u8>> {
        let mut snap = self.snapshot().await?;
        if snap.token_key.is_empty() {
            self.change(Change::InitTokenKey {
                key: token::generate_key(),
            })
            .await?;
            snap = self.snapshot().await?;
        }
        token::decode_hex(&snap.token_key).context("the cluster's token key is not hex")
    }

    /// Creates a token for `owner`; returns its record and the secret.
    pub(crate) async fn create_token(
        &self,
        owner: TokenOwner,
        scopes: Vec<Scope>,
        expires_at: Option<i64>,
        label: String,
    ) -> Result<(TokenRecord, String)> {
        let key = self.token_key().await?;
        let (id, secret) = token::generate(owner.token_kind());
        let record = TokenRecord {
            id,
            owner,
            label,
            scopes,
            hash: token::hash(&key, &secret),
            created_at: 0,
            created_by: String::new(),
            expires_at,
            revoked_at: None,
            last_used: None,
        };
        match self.change(Change::CreateToken(record)).await? {
            Outcome::Token(t) => Ok((t, secret)),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    pub(crate) async fn add_user(&self, user: User) -> Result<User> {
        match self.change(Change::AddUser(user)).await? {
            Outcome::User(u) => Ok(u),
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

fn parse_scopes(given: &[String]) -> Result<Vec<Scope>> {
    if given.is_empty() {
        return Ok(Scope::ALL.to_vec());
    }
    given
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| {
            Scope::parse(s.trim()).with_context(|| {
                let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown scope {s:?}; scopes: {}", all.join(", "))
            })
        })
        .collect()
}

fn when(t: Option<i64>) -> String {
    t.map_or("never".into(), cairn_router::rest::rfc3339)
}

pub async fn run_user(args: UserArgs) -> Result<()> {
    let dir = Directory::of(&args.target)?;
    match args.command {
        UserCommand::Add {
            username,
            display_name,
            email,
            admin,
            password_stdin,
        } => {
            let password_hash = if password_stdin {
                let mut p = String::new();
                std::io::stdin().read_to_string(&mut p)?;
                let p = p.trim_end_matches(['\r', '\n']);
                Some(cairn_identity::password::hash(p)?)
            } else {
                None
            };
            let user = dir
                .add_user(User {
                    uuid: cairn_identity::new_uuid(),
                    display_name: display_name.unwrap_or_else(|| username.clone()),
                    username,
                    email,
                    site_admin: admin,
                    password_hash: None,
                    created_at: 0,
                })
                .await?;
            if let Some(hash) = password_hash {
                dir.change(Change::SetPassword {
                    username: user.username.clone(),
                    hash,
                })
                .await?;
            }
            println!("created user {} {}", user.username, user.uuid);
        }
        UserCommand::List => {
            let mut users = dir.snapshot().await?.users;
            users.sort_by(|a, b| a.username.cmp(&b.username));
            for u in users {
                let admin = if u.site_admin { " (site admin)" } else { "" };
                println!("{} {} {:?}{admin}", u.username, u.uuid, u.display_name);
            }
        }
    }
    Ok(())
}

pub async fn run_token(args: TokenArgs) -> Result<()> {
    let dir = Directory::of(&args.target)?;
    match args.command {
        TokenCommand::Create {
            user,
            repository,
            workspace,
            scopes,
            expires_in,
            label,
        } => {
            let owner = match (user, repository, workspace) {
                (Some(u), None, None) => TokenOwner::User(u.to_ascii_lowercase()),
                (None, Some(r), None) => {
                    let (workspace, slug) = crate::split_full_name(&r)?;
                    TokenOwner::Repository {
                        workspace: workspace.to_ascii_lowercase(),
                        slug: slug.to_ascii_lowercase(),
                    }
                }
                (None, None, Some(w)) => TokenOwner::Workspace(w.to_ascii_lowercase()),
                _ => bail!("say whose token: --user, --repository or --workspace"),
            };
            let scopes = parse_scopes(&scopes)?;
            let expires_at = expires_in.map(|s| now() + s as i64);
            let (record, secret) = dir.create_token(owner, scopes, expires_at, label).await?;
            let names: Vec<&str> = record.scopes.iter().map(|s| s.as_str()).collect();
            eprintln!(
                "token {} for {}; scopes {}; expires {}. It is shown once:",
                record.id,
                record.owner.describe(),
                names.join(" "),
                when(record.expires_at)
            );
            println!("{secret}");
        }
        TokenCommand::List { user } => {
            let mut tokens = dir.snapshot().await?.tokens;
            tokens.sort_by_key(|t| t.created_at);
            for t in tokens {
                if let Some(u) = &user {
                    if t.owner != TokenOwner::User(u.to_ascii_lowercase()) {
                        continue;
                    }
                }
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if !t.is_live(now()) {
                    "expired"
                } else {
                    "live"
                };
                let names: Vec<&str> = t.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "{} {state} {} {:?} scopes={} created={} expires={} last-used={}",
                    t.id,
                    t.owner.describe(),
                    t.label,
                    names.join(","),
                    when(Some(t.created_at)),
                    when(t.expires_at),
                    when(t.last_used)
                );
            }
        }
        TokenCommand::Revoke { token: given } => {
            let id = token::id_of(given.trim()).context("not a token or token id")?;
            dir.change(Change::RevokeToken { id: id.to_owned() })
                .await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn perm_target(s: &str) -> Result<PermTarget> {
    PermTarget::parse(s).with_context(|| format!("expected WORKSPACE or WORKSPACE/REPO, got {s:?}"))
}

pub async fn run_perm(args: PermArgs) -> Result<()> {
    let dir = Directory::of(&args.target)?;
    match args.command {
        PermCommand::Grant {
            user,
            target,
            level,
        } => {
            let level = Level::parse(&level).context("LEVEL is read, write or admin")?;
            let target = perm_target(&target)?;
            dir.change(Change::Grant(cairn_identity::Grant {
                user: user.clone(),
                target: target.clone(),
                level,
            }))
            .await?;
            println!("{user} has {} on {target}", level.as_str());
        }
        PermCommand::Revoke { user, target } => {
            let target = perm_target(&target)?;
            dir.change(Change::Revoke {
                user: user.clone(),
                target: target.clone(),
            })
            .await?;
            println!("{user} has no permission of its own on {target}");
        }
        PermCommand::Role {
            workspace,
            user,
            role,
        } => {
            let role = match role.as_str() {
                "none" => None,
                r => Some(Role::parse(r).context("ROLE is owner, member, collaborator or none")?),
            };
            dir.change(Change::SetRole {
                workspace: workspace.clone(),
                user: user.clone(),
                role,
            })
            .await?;
            println!(
                "{user} is {} of {workspace}",
                role.map_or("no member", Role::as_str)
            );
        }
        PermCommand::List => {
            let snap = dir.snapshot().await?;
            for m in &snap.memberships {
                println!("{} {} of {}", m.user, m.role.as_str(), m.workspace);
            }
            for g in &snap.grants {
                println!("{} {} on {}", g.user, g.level.as_str(), g.target);
            }
        }
    }
    Ok(())
}

pub async fn run_ssh_key(args: SshKeyArgs) -> Result<()> {
    let dir = Directory::of(&args.target)?;
    match args.command {
        SshKeyCommand::Add { user, file, label } => {
            let mut text = String::new();
            if file.as_os_str() == "-" {
                std::io::stdin()
                    .take(cairn_identity::sshkey::MAX_LINE as u64 + 1)
                    .read_to_string(&mut text)?;
            } else {
                std::fs::File::open(&file)
                    .with_context(|| format!("reading {}", file.display()))?
                    .take(cairn_identity::sshkey::MAX_LINE as u64 + 1)
                    .read_to_string(&mut text)?;
            }
            let parsed = cairn_identity::sshkey::parse(text.trim()).map_err(anyhow::Error::msg)?;
            let key = cairn_identity::SshKey {
                uuid: cairn_identity::new_uuid(),
                fingerprint: parsed.fingerprint,
                owner: cairn_identity::KeyOwner::User(user.to_ascii_lowercase()),
                algorithm: parsed.algorithm,
                key: parsed.blob,
                comment: parsed.comment,
                label,
                created_at: 0,
                last_used: None,
            };
            match dir.change(Change::AddKey(key)).await? {
                Outcome::Key(k) => println!("added {} {} for {user}", k.algorithm, k.fingerprint),
                other => bail!("unexpected answer {other:?}"),
            }
        }
        SshKeyCommand::List { user } => {
            let owner = cairn_identity::KeyOwner::User(user.to_ascii_lowercase());
            for k in dir
                .snapshot()
                .await?
                .ssh_keys
                .iter()
                .filter(|k| k.owner == owner)
            {
                println!(
                    "{} {} {:?} {:?}",
                    k.fingerprint, k.algorithm, k.comment, k.label
                );
            }
        }
        SshKeyCommand::Remove { fingerprint } => {
            dir.change(Change::RemoveKey {
                fingerprint: fingerprint.clone(),
            })
            .await?;
            println!("removed {fingerprint}");
        }
    }
    Ok(())
}

pub async fn run_audit(args: AuditArgs) -> Result<()> {
    let urls = node_urls(&args.target)?;
    let pool = NodePool::default();
    let AuditCommand::Tail {
        mut after,
        follow,
        json,
    } = args.command;
    loop {
        let (r, _) = follow_leader(&pool, &RetryPolicy::default(), &urls, |ch| async move {
            Ok(IdentityClient::new(ch)
                .audit(AuditRequest { after, limit: 1000 })
                .await?)
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        let events: Vec<AuditEvent> = serde_json::from_slice(&r.into_inner().events_json)?;
        let mut out = String::new();
        for e in &events {
            after = after.max(e.seq);
            if json {
                out.push_str(&serde_json::to_string(e)?);
            } else {
                let actor = if e.actor.is_empty() { "-" } else { &e.actor };
                let from = if e.from.is_empty() { "-" } else { &e.from };
                out.push_str(&format!(
                    "#{} {} {actor} from {from}: {} {}",
                    e.seq,
                    cairn_router::rest::rfc3339(e.at),
                    e.action,
                    e.target
                ));
                if !e.detail.is_empty() {
                    out.push_str(&format!(" ({})", e.detail));
                }
            }
            out.push('\n');
        }
        print!("{out}");
        if events.len() < 1000 && !follow {
            return Ok(());
        }
        if events.len() < 1000 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}
