//! Identity changes as the meta group logs and applies them.
//!
//! Each [`Request`] carries who made it, from where and when (the
//! proposer's clock, so every replica applies the same entry alike) and
//! one [`Change`]. [`apply`] checks it against the rows as they stand and
//! either refuses it whole or writes it, a new version (so routers know to
//! fetch again) and an audit record. Reads in `apply` see the rows as they
//! were before the entry, which is why each change touches each row once.

use serde::{Deserialize, Serialize};

use crate::model::{
    Grant, KeyOwner, Membership, Role, Snapshot, SshKey, Target, TokenOwner, TokenRecord, User,
};

/// A key and its value.
pub type Row = (Vec<u8>, Vec<u8>);

/// Row access for [`apply`] and the reads: the meta group's state.
pub trait Rows {
    type Error;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
    /// At most `limit` rows under `prefix` sorting after `after`.
    fn scan_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, Self::Error>;
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Row>, Self::Error> {
        self.scan_page(prefix, None, usize::MAX)
    }
}

pub trait RowsMut: Rows {
    fn put(&mut self, key: &[u8], value: &[u8]);
    fn delete(&mut self, key: &[u8]);
}

/// Bounds on what one owner may hold; each keeps the snapshot routers
/// cache, and every listing, bounded.
pub const MAX_TOKENS_PER_OWNER: usize = 100;
pub const MAX_KEYS_PER_OWNER: usize = 50;
pub const MAX_LABEL_BYTES: usize = 255;
pub const MAX_EMAIL_BYTES: usize = 254;
pub const MAX_USERNAME_LEN: usize = 30;
/// Audit records kept; the oldest go first.
pub const AUDIT_KEPT: u64 = 100_000;
/// Most audit records one request may append.
pub const MAX_AUDIT_BATCH: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Acting username, `token:<id>`, or `cairn` for the cluster itself.
    pub actor: String,
    /// Client address, when the change came over the network.
    pub from: String,
    /// Seconds since the epoch, on the proposer's clock.
    pub at: i64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The cluster's token hash key; set once, by whoever first needs it.
    InitTokenKey {
        key: String,
    },
    AddUser(User),
    UpdateUser {
        username: String,
        display_name: Option<String>,
        email: Option<String>,
        site_admin: Option<bool>,
    },
    SetPassword {
        username: String,
        hash: String,
    },
    CreateToken(TokenRecord),
    RevokeToken {
        id: String,
    },
    /// Last-used times, batched by routers (not audited, no new version).
    TouchTokens(Vec<(String, i64)>),
    Grant(Grant),
    Revoke {
        user: String,
        target: Target,
    },
    SetRole {
        workspace: String,
        user: String,
        role: Option<Role>,
    },
    AddKey(SshKey),
    RemoveKey {
        fingerprint: String,
    },
    /// Events the routers saw (failed sign-ins, repository creation,
    /// deletion, visibility changes), batched.
    Record(Vec<AuditEvent>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    User(User),
    Token(TokenRecord),
    Key(SshKey),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// Refused as a whole; nothing changed. The reason is for people.
    #[error("{0}")]
    Refused(String),
    #[error("corrupt identity row {key}: {message}")]
    Corrupt { key: String, message: String },
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Assigned on apply; 0 in a [`Change::Record`].
    #[serde(default)]
    pub seq: u64,
    pub at: i64,
    pub actor: String,
    pub from: String,
    /// `user:add`, `token:create`, `token:revoke`, `perm:grant`,
    /// `signin:failed`, `repo:create`, …
    pub action: String,
    pub target: String,
    #[serde(default)]
    pub detail: String,
}

mod keys {
    pub const VERSION: &[u8] = b"iv";
    pub const TOKEN_KEY: &[u8] = b"ik";
    pub const USERS: &[u8] = b"iu/";
    pub const TOKENS: &[u8] = b"it/";
    pub const GRANTS: &[u8] = b"ig/";
    pub const MEMBERS: &[u8] = b"im/";
    pub const KEYS: &[u8] = b"is/";
    pub const AUDIT: &[u8] = b"ia/";
    pub const AUDIT_NEXT: &[u8] = b"ian";

    pub fn with(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
        let mut k = prefix.to_vec();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(b'/');
            }
            k.extend_from_slice(p.as_bytes());
        }
        k
    }

    pub fn audit(seq: u64) -> Vec<u8> {
        [AUDIT, &seq.to_be_bytes()].concat()
    }
}

/// Every row prefix identity changes write: the meta group reserves them.
pub const ROW_PREFIXES: &[&[u8]] = &[b"i"];

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("identity rows serialize")
}

fn corrupt(key: &[u8], message: impl ToString) -> ChangeError {
    ChangeError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: message.to_string(),
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, ChangeError> {
    Err(ChangeError::Refused(why.into()))
}

fn get<T: for<'de> Deserialize<'de>, R: Rows>(
    rows: &R,
    key: &[u8],
) -> Result<Option<T>, ChangeError>
where
    R::Error: std::fmt::Display,
{
    match rows.get(key).map_err(|e| corrupt(key, e))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| corrupt(key, e)),
    }
}

fn all<T: for<'de> Deserialize<'de>, R: Rows>(
    rows: &R,
    prefix: &[u8],
) -> Result<Vec<T>, ChangeError>
where
    R::Error: std::fmt::Display,
{
    rows.scan_prefix(prefix)
        .map_err(|e| corrupt(prefix, e))?
        .iter()
        .map(|(k, v)| serde_json::from_slice(v).map_err(|e| corrupt(k, e)))
        .collect()
}

fn exists<R: Rows>(rows: &R, key: &[u8]) -> Result<bool, ChangeError>
where
    R::Error: std::fmt::Display,
{
    Ok(rows.get(key).map_err(|e| corrupt(key, e))?.is_some())
}

fn read_u64<R: Rows>(rows: &R, key: &[u8]) -> Result<u64, ChangeError>
where
    R::Error: std::fmt::Display,
{
    match rows.get(key).map_err(|e| corrupt(key, e))? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| corrupt(key, "not 8 bytes"))?,
        )),
    }
}

/// Usernames: 1-30 of `a-z 0-9 - _`, starting with a letter or digit,
/// compared without case; `x-token-auth` is git's token convention.
pub fn validate_username(name: &str) -> Result<String, ChangeError> {
    let lower = name.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= MAX_USERNAME_LEN
        && lower.as_bytes()[0].is_ascii_alphanumeric()
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && lower != "x-token-auth";
    if ok {
        Ok(lower)
    } else {
        refuse(format!(
            "invalid username {name:?}: use 1-{MAX_USERNAME_LEN} letters, digits, '-' or '_', starting with a letter or digit"
        ))
    }
}

fn check_text(what: &str, value: &str, limit: usize) -> Result<(), ChangeError> {
    if value.len() > limit || value.chars().any(char::is_control) {
        return refuse(format!(
            "{what} must be at most {limit} bytes without control characters"
        ));
    }
    Ok(())
}

fn audit_key_of_target(t: &Target) -> String {
    t.to_string()
}

/// Applies `request`; on refusal nothing is written.
pub fn apply<R: RowsMut>(rows: &mut R, request: Request) -> Result<Outcome, ChangeError>
where
    R::Error: std::fmt::Display,
{
    let Request {
        actor,
        from,
        at,
        change,
    } = request;
    let audit = |action: &str, target: String, detail: String| AuditEvent {
        seq: 0,
        at,
        actor: actor.clone(),
        from: from.clone(),
        action: action.to_owned(),
        target,
        detail,
    };
    let (outcome, events, bump) = match change {
        Change::InitTokenKey { key } => {
            if rows
                .get(keys::TOKEN_KEY)
                .map_err(|e| corrupt(keys::TOKEN_KEY, e))?
                .is_some()
            {
                return Ok(Outcome::Done);
            }
            if crate::token::decode_hex(&key).is_none_or(|k| k.len() < 32) {
                return refuse("a token key is 32 bytes or more, in hex");
            }
            rows.put(keys::TOKEN_KEY, key.as_bytes());
            (Outcome::Done, vec![], true)
        }
        Change::AddUser(mut user) => {
            user.username = validate_username(&user.username)?;
            check_text("display name", &user.display_name, MAX_LABEL_BYTES)?;
            check_text("email", &user.email, MAX_EMAIL_BYTES)?;
            let key = keys::with(keys::USERS, &[&user.username]);
            if exists(rows, &key)? {
                return refuse(format!("user {} already exists", user.username));
            }
            user.created_at = at;
            rows.put(&key, &json(&user));
            let detail = if user.site_admin { "site admin" } else { "" };
            let e = audit("user:add", user.username.clone(), detail.into());
            (Outcome::User(user), vec![e], true)
        }
        Change::UpdateUser {
            username,
            display_name,
            email,
            site_admin,
        } => {
            let key = keys::with(keys::USERS, &[&username.to_ascii_lowercase()]);
            let Some(mut user) = get::<User, _>(rows, &key)? else {
                return refuse(format!("no user {username}"));
            };
            let mut detail = Vec::new();
            if let Some(d) = display_name {
                check_text("display name", &d, MAX_LABEL_BYTES)?;
                user.display_name = d;
                detail.push("display name");
            }
            if let Some(e) = email {
                check_text("email", &e, MAX_EMAIL_BYTES)?;
                user.email = e;
                detail.push("email");
            }
            if let Some(a) = site_admin {
                user.site_admin = a;
                detail.push(if a { "site admin" } else { "not site admin" });
            }
            rows.put(&key, &json(&user));
            let e = audit("user:update", user.username.clone(), detail.join(", "));
            (Outcome::User(user), vec![e], true)
        }
        Change::SetPassword { username, hash } => {
            let key = keys::with(keys::USERS, &[&username.to_ascii_lowercase()]);
            let Some(mut user) = get::<User, _>(rows, &key)? else {
                return refuse(format!("no user {username}"));
            };
            if !hash.starts_with("$argon2") {
                return refuse("passwords are stored as Argon2 hashes only");
            }
            user.password_hash = Some(hash);
            rows.put(&key, &json(&user));
            let e = audit("user:password", user.username.clone(), String::new());
            (Outcome::Done, vec![e], true)
        }
        Change::CreateToken(mut token) => {
            if crate::token::id_of(&token.id) != Some(token.id.as_str())
                || !token.id.starts_with(token.owner.token_kind().prefix())
            {
                return refuse(format!("malformed token id {:?}", token.id));
            }
            if crate::token::decode_hex(&token.hash).is_none_or(|h| h.len() != 32) {
                return refuse("a token is stored as its 32-byte keyed hash");
            }
            if rows
                .get(keys::TOKEN_KEY)
                .map_err(|e| corrupt(keys::TOKEN_KEY, e))?
                .is_none()
            {
                return refuse("the cluster has no token key yet");
            }
            check_text("label", &token.label, MAX_LABEL_BYTES)?;
            if token.scopes.is_empty() {
                return refuse("a token needs at least one scope");
            }
            if token.expires_at.is_some_and(|e| e <= at) {
                return refuse("the token would expire before it is created");
            }
            if let TokenOwner::User(u) = &token.owner {
                let key = keys::with(keys::USERS, &[u]);
                if !exists(rows, &key)? {
                    return refuse(format!("no user {u}"));
                }
            }
            let key = keys::with(keys::TOKENS, &[&token.id]);
            if exists(rows, &key)? {
                return refuse(format!("token {} exists", token.id));
            }
            let held = all::<TokenRecord, _>(rows, keys::TOKENS)?
                .into_iter()
                .filter(|t| t.owner == token.owner && t.is_live(at))
                .count();
            if held >= MAX_TOKENS_PER_OWNER {
                return refuse(format!(
                    "{} already holds {MAX_TOKENS_PER_OWNER} live tokens; revoke one first",
                    token.owner.describe()
                ));
            }
            token.created_at = at;
            token.created_by = actor.clone();
            token.revoked_at = None;
            token.last_used = None;
            rows.put(&key, &json(&token));
            let scopes: Vec<&str> = token.scopes.iter().map(|s| s.as_str()).collect();
            let e = audit(
                "token:create",
                token.id.clone(),
                format!(
                    "for {}; scopes {}",
                    token.owner.describe(),
                    scopes.join(" ")
                ),
            );
            (Outcome::Token(token), vec![e], true)
        }
        Change::RevokeToken { id } => {
            let key = keys::with(keys::TOKENS, &[&id]);
            let Some(mut token) = get::<TokenRecord, _>(rows, &key)? else {
                return refuse(format!("no token {id}"));
            };
            if token.revoked_at.is_none() {
                token.revoked_at = Some(at);
                rows.put(&key, &json(&token));
            }
            let e = audit("token:revoke", id, token.owner.describe());
            (Outcome::Token(token), vec![e], true)
        }
        Change::TouchTokens(mut used) => {
            used.sort();
            used.reverse();
            used.dedup_by(|a, b| a.0 == b.0);
            for (id, when) in used {
                let key = keys::with(keys::TOKENS, &[&id]);
                if let Some(mut token) = get::<TokenRecord, _>(rows, &key)? {
                    if token.last_used.is_none_or(|l| l < when) {
                        token.last_used = Some(when);
                        rows.put(&key, &json(&token));
                    }
                }
            }
            (Outcome::Done, vec![], false)
        }
        Change::Grant(mut grant) => {
            grant.user = grant.user.to_ascii_lowercase();
            let ukey = keys::with(keys::USERS, &[&grant.user]);
            if !exists(rows, &ukey)? {
                return refuse(format!("no user {}", grant.user));
            }
            let target = grant.target.to_string();
            let key = keys::with(keys::GRANTS, &[&grant.user, &target]);
            rows.put(&key, &json(&grant));
            let e = audit(
                "perm:grant",
                target,
                format!("{} to {}", grant.level.as_str(), grant.user),
            );
            (Outcome::Done, vec![e], true)
        }
        Change::Revoke { user, target } => {
            let user = user.to_ascii_lowercase();
            let t = audit_key_of_target(&target);
            let key = keys::with(keys::GRANTS, &[&user, &t]);
            if !exists(rows, &key)? {
                return refuse(format!("{user} holds no permission on {t}"));
            }
            rows.delete(&key);
            let e = audit("perm:revoke", t, format!("from {user}"));
            (Outcome::Done, vec![e], true)
        }
        Change::SetRole {
            workspace,
            user,
            role,
        } => {
            let (ws, user) = (workspace.to_ascii_lowercase(), user.to_ascii_lowercase());
            let ukey = keys::with(keys::USERS, &[&user]);
            if !exists(rows, &ukey)? {
                return refuse(format!("no user {user}"));
            }
            let key = keys::with(keys::MEMBERS, &[&user, &ws]);
            match role {
                Some(role) => rows.put(
                    &key,
                    &json(&Membership {
                        workspace: ws.clone(),
                        user: user.clone(),
                        role,
                    }),
                ),
                None => rows.delete(&key),
            }
            let what = role.map_or("none", Role::as_str);
            let e = audit("member:role", ws, format!("{user} is {what}"));
            (Outcome::Done, vec![e], true)
        }
        Change::AddKey(mut key) => {
            check_text("label", &key.label, MAX_LABEL_BYTES)?;
            check_text("comment", &key.comment, MAX_LABEL_BYTES)?;
            // The fingerprint is the key's: computed here, never taken.
            let parsed = crate::sshkey::parse(&format!("{} {}", key.algorithm, key.key))
                .map_err(ChangeError::Refused)?;
            key.fingerprint = parsed.fingerprint;
            let row = keys::with(keys::KEYS, &[&key.fingerprint]);
            if exists(rows, &row)? {
                return refuse("this key is already registered");
            }
            if let KeyOwner::User(u) = &key.owner {
                let ukey = keys::with(keys::USERS, &[u]);
                if !exists(rows, &ukey)? {
                    return refuse(format!("no user {u}"));
                }
            }
            let held = all::<SshKey, _>(rows, keys::KEYS)?
                .into_iter()
                .filter(|k| k.owner == key.owner)
                .count();
            if held >= MAX_KEYS_PER_OWNER {
                return refuse(format!("at most {MAX_KEYS_PER_OWNER} keys per owner"));
            }
            key.created_at = at;
            rows.put(&row, &json(&key));
            let e = audit(
                "key:add",
                key.fingerprint.clone(),
                format!("{:?}", key.owner),
            );
            (Outcome::Key(key), vec![e], true)
        }
        Change::RemoveKey { fingerprint } => {
            let row = keys::with(keys::KEYS, &[&fingerprint]);
            if !exists(rows, &row)? {
                return refuse(format!("no key {fingerprint}"));
            }
            rows.delete(&row);
            (
                Outcome::Done,
                vec![audit("key:remove", fingerprint, String::new())],
                true,
            )
        }
        Change::Record(events) => {
            if events.len() > MAX_AUDIT_BATCH {
                return refuse(format!("at most {MAX_AUDIT_BATCH} audit records at once"));
            }
            (Outcome::Done, events, false)
        }
    };
    if bump {
        let v = read_u64(rows, keys::VERSION)? + 1;
        rows.put(keys::VERSION, &v.to_be_bytes());
    }
    if !events.is_empty() {
        let mut seq = read_u64(rows, keys::AUDIT_NEXT)?.max(1);
        for mut e in events {
            e.seq = seq;
            for (field, limit) in [(&mut e.target, 512), (&mut e.detail, 1024)] {
                if field.len() > limit {
                    let mut cut = limit;
                    while !field.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    field.truncate(cut);
                }
            }
            rows.put(&keys::audit(seq), &json(&e));
            if seq > AUDIT_KEPT {
                rows.delete(&keys::audit(seq - AUDIT_KEPT));
            }
            seq += 1;
        }
        rows.put(keys::AUDIT_NEXT, &seq.to_be_bytes());
    }
    Ok(outcome)
}

/// What routers cache: everything but password hashes.
pub fn snapshot<R: Rows>(rows: &R) -> Result<Snapshot, ChangeError>
where
    R::Error: std::fmt::Display,
{
    let mut users: Vec<User> = all(rows, keys::USERS)?;
    for u in &mut users {
        u.password_hash = None;
    }
    let token_key = rows
        .get(keys::TOKEN_KEY)
        .map_err(|e| corrupt(keys::TOKEN_KEY, e))?
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .unwrap_or_default();
    Ok(Snapshot {
        version: version(rows)?,
        token_key,
        users,
        grants: all(rows, keys::GRANTS)?,
        memberships: all(rows, keys::MEMBERS)?,
        tokens: all(rows, keys::TOKENS)?,
        ssh_keys: all(rows, keys::KEYS)?,
    })
}

pub fn version<R: Rows>(rows: &R) -> Result<u64, ChangeError>
where
    R::Error: std::fmt::Display,
{
    read_u64(rows, keys::VERSION)
}

/// One user with the password hash, for sign-in on a meta replica.
pub fn user<R: Rows>(rows: &R, username: &str) -> Result<Option<User>, ChangeError>
where
    R::Error: std::fmt::Display,
{
    get(
        rows,
        &keys::with(keys::USERS, &[&username.to_ascii_lowercase()]),
    )
}

/// Audit records after `after`, oldest first, at most `limit`.
pub fn audit_after<R: Rows>(
    rows: &R,
    after: u64,
    limit: usize,
) -> Result<Vec<AuditEvent>, ChangeError>
where
    R::Error: std::fmt::Display,
{
    let start = keys::audit(after);
    let page = rows
        .scan_page(keys::AUDIT, Some(&start), limit)
        .map_err(|e| corrupt(keys::AUDIT, e))?;
    let mut out = Vec::with_capacity(page.len());
    for (k, v) in page {
        out.push(serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Rows in memory, with the meta group's rule: reads in one apply see
    /// the state before it.
    #[derive(Default)]
    struct Mem {
        rows: BTreeMap<Vec<u8>, Vec<u8>>,
    }

    impl Rows for Mem {
        type Error = String;
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
            Ok(self.rows.get(key).cloned())
        }
        fn scan_page(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<Row>, String> {
            Ok(self
                .rows
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    impl RowsMut for Mem {
        fn put(&mut self, key: &[u8], value: &[u8]) {
            self.rows.insert(key.to_vec(), value.to_vec());
        }
        fn delete(&mut self, key: &[u8]) {
            self.rows.remove(key);
        }
    }

    fn req(change: Change) -> Request {
        Request {
            actor: "root".into(),
            from: "127.0.0.1".into(),
            at: 1000,
            change,
        }
    }

    fn new_user(name: &str) -> Change {
        Change::AddUser(User {
            uuid: "{u}".into(),
            username: name.into(),
            display_name: name.into(),
            email: String::new(),
            site_admin: false,
            password_hash: None,
            created_at: 0,
        })
    }

    #[test]
    fn users_tokens_and_grants_round_trip_with_audit() {
        let mut m = Mem::default();
        apply(&mut m, req(new_user("Alice"))).expect("add");
        assert!(matches!(
            apply(&mut m, req(new_user("alice"))),
            Err(ChangeError::Refused(_))
        ));
        assert!(apply(&mut m, req(new_user("x-token-auth"))).is_err());
        let key = crate::token::generate_key();
        apply(&mut m, req(Change::InitTokenKey { key: key.clone() })).expect("key");
        let (id, secret) = crate::token::generate(crate::token::Kind::Personal);
        let kb = crate::token::decode_hex(&key).expect("hex");
        let record = TokenRecord {
            id: id.clone(),
            owner: TokenOwner::User("alice".into()),
            label: "ci".into(),
            scopes: vec![crate::Scope::Repository],
            hash: crate::token::hash(&kb, &secret),
            created_at: 0,
            created_by: String::new(),
            expires_at: None,
            revoked_at: None,
            last_used: None,
        };
        apply(&mut m, req(Change::CreateToken(record))).expect("token");
        apply(
            &mut m,
            req(Change::Grant(Grant {
                user: "ALICE".into(),
                target: Target::parse("ws/r").expect("t"),
                level: crate::Level::Write,
            })),
        )
        .expect("grant");
        let v = version(&m).expect("v");
        apply(
            &mut m,
            req(Change::TouchTokens(vec![(id.clone(), 5), (id.clone(), 9)])),
        )
        .expect("touch");
        assert_eq!(version(&m).expect("v"), v, "touching does not bump");
        let snap = snapshot(&m).expect("snapshot");
        assert_eq!(snap.users.len(), 1);
        assert_eq!(snap.tokens[0].last_used, Some(9));
        assert_eq!(snap.grants[0].user, "alice");
        let rows = format!("{:?}", m.rows);
        assert!(!rows.contains(&secret[21..]), "the secret is never stored");
        apply(&mut m, req(Change::RevokeToken { id })).expect("revoke");
        let snap = snapshot(&m).expect("snapshot");
        assert!(!snap.tokens[0].is_live(2000));
        let log = audit_after(&m, 0, 100).expect("audit");
        let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["user:add", "token:create", "perm:grant", "token:revoke"]
        );
        assert!(log
            .iter()
            .all(|e| e.actor == "root" && e.from == "127.0.0.1"));
        assert_eq!(
            audit_after(&m, log[1].seq, 1).expect("audit")[0].action,
            "perm:grant"
        );
    }

    #[test]
    fn refusals_change_nothing() {
        let mut m = Mem::default();
        apply(&mut m, req(new_user("bob"))).expect("add");
        let before = m.rows.clone();
        for bad in [
            Change::Revoke {
                user: "bob".into(),
                target: Target::parse("ws").expect("t"),
            },
            Change::RevokeToken {
                id: "cnp_0000000000000000".into(),
            },
            Change::SetPassword {
                username: "bob".into(),
                hash: "plain".into(),
            },
            Change::Grant(Grant {
                user: "carol".into(),
                target: Target::parse("ws").expect("t"),
                level: crate::Level::Read,
            }),
        ] {
            assert!(apply(&mut m, req(bad)).is_err());
            assert_eq!(m.rows, before);
        }
    }
}
