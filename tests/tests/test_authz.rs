//! Identities and authorization end to end: who may read, push and
//! administer which repository — users with workspace and repository
//! grants, personal tokens and their scopes, repository and workspace access
//! tokens, public and private repositories, invalid credentials (unknown,
//! revoked, expired, not the owner's) — and that nobody learns anything they
//! may not: a private repository answers exactly like a missing one to
//! whoever cannot read it. Also: a revoked token stops working within
//! seconds, and token secrets are never written in clear to the data folder
//! or the logs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use cairn_tests::*;

/// `-c` options making git send its Basic credentials with the first
/// request instead of after a 401. Without them a public repository answers
/// git's anonymous first request, git never presents its credentials, and
/// invalid credentials could not be told from none (git 2.46 and later).
const PROACTIVE_AUTH: [&str; 2] = ["-c", "http.proactiveAuth=basic"];

/// How long a change of tokens or grants may take to reach every process:
/// the 2 s revocation bound, plus a margin.
const PROPAGATION: Duration = Duration::from_millis(2250);

// ---------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------

/// Runs `cairn ARGS --data-dir DIR`; fails, with both streams, unless it
/// succeeds. Returns stdout.
fn cairn_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let out = c.cli(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "cairn {} failed with {}:\n{stdout}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn add_user(c: &Cluster, name: &str) -> Result<()> {
    cairn_ok(c, &["user", "add", name]).map(drop)
}

/// `cairn perm grant USER TARGET LEVEL` (TARGET `WS` or `WS/SLUG`).
fn grant(c: &Cluster, user: &str, target: &str, level: &str) -> Result<()> {
    cairn_ok(c, &["perm", "grant", user, target, level]).map(drop)
}

/// `cairn token revoke` with the whole secret or its id part.
fn revoke(c: &Cluster, token_or_id: &str) -> Result<()> {
    cairn_ok(c, &["token", "revoke", token_or_id]).map(drop)
}

/// A token as `cairn token create` prints it: `cnX_<16 hex id>_<64 hex>`.
#[derive(Debug, Clone)]
struct Token {
    secret: String,
}

impl Token {
    /// Checks that `stdout` is exactly one line holding a token of `kind`
    /// (`p` personal, `r` repository, `w` workspace).
    fn parse(kind: char, stdout: &str) -> Result<Self> {
        let line = stdout.strip_suffix('\n').unwrap_or(stdout);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let parts: Vec<&str> = line.split('_').collect();
        ensure!(
            !line.contains('\n')
                && parts.len() == 3
                && parts[0] == format!("cn{kind}")
                && hex(parts[1], 16)
                && hex(parts[2], 64),
            "token create printed {stdout:?}, not one line `cn{kind}_<16 hex>_<64 hex>`"
        );
        Ok(Self {
            secret: line.to_owned(),
        })
    }

    /// The id part (`cnX_<16 hex>`), which names the token without its
    /// secret (e.g. to revoke it).
    fn id(&self) -> &str {
        &self.secret[..20]
    }

    /// The 64-hex secret part: what must never be stored in clear.
    fn secret_hex(&self) -> &str {
        &self.secret[21..]
    }
}

/// `cairn token create ARGS`, checking the printed token is of `kind`.
fn create_token(c: &Cluster, kind: char, args: &[&str]) -> Result<Token> {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    Token::parse(kind, &cairn_ok(c, &all)?)
}

/// A well-formed personal token no one created.
fn unknown_token() -> String {
    let mut rng = Rng::new(u64::from(std::process::id()) ^ 0x0005_eed0_fa11);
    let id = rng.next_u64();
    let secret: String = (0..4).map(|_| format!("{:016x}", rng.next_u64())).collect();
    format!("cnp_{id:016x}_{secret}")
}

// ---------------------------------------------------------------------------
// Repositories
// ---------------------------------------------------------------------------

/// Creates `full` as the site admin, public or private, asserting 201.
fn create_repo_as_admin(c: &Cluster, full: &str, public: bool) -> Result<()> {
    let path = format!("/2.0/repositories/{full}");
    let body = format!(r#"{{"scm":"git","is_private":{}}}"#, !public);
    let r = c
        .request("POST", &path)
        .header("Content-Type", "application/json")
        .body(body.as_bytes())
        .send(c.http_url())?;
    ensure!(
        r.status == 201,
        "POST {path} {body}: {} {}",
        r.status,
        r.text()
    );
    Ok(())
}

/// Pushes one commit on `main` to each repository as the site admin;
/// returns the local repository and the commit.
fn seed_repos(c: &Cluster, git: &Git, repos: &[&str]) -> Result<(Repo, String)> {
    let work = git.init(git.scratch("seed"))?;
    let seed = work.commit_file("README", "seed\n", "seed")?;
    for full in repos {
        work.run(["push", "-q", &c.repo_url(full), "main"])?;
    }
    Ok((work, seed))
}

// ---------------------------------------------------------------------------
// Principals and the rules
// ---------------------------------------------------------------------------

/// Permission levels, ordered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Level {
    NoAccess,
    Read,
    Write,
    Admin,
}

/// What a token's scopes allow: read (`repository`), push
/// (`repository:write`), delete a repository (`repository:delete`).
#[derive(Clone, Copy, Debug)]
struct Caps {
    read: bool,
    write: bool,
    delete: bool,
}

/// A token created without `--scope`.
const ALL_SCOPES: Caps = Caps {
    read: true,
    write: true,
    delete: true,
};

/// A token whose scopes reach no repository (e.g. only `account`).
const NO_REPO_SCOPES: Caps = Caps {
    read: false,
    write: false,
    delete: false,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    Anonymous,
    /// Credentials the server must refuse outright.
    Invalid,
    Valid,
}

/// A caller, with what the rules give it.
struct Principal {
    name: &'static str,
    auth: Auth,
    /// Basic user name and secret (also put in git URLs); `None`: anonymous.
    cred: Option<(String, String)>,
    /// Whether REST calls carry the secret as `Bearer` rather than Basic.
    bearer: bool,
    /// Permission on the [private, public] repository (grants, or what an
    /// access token is bound to).
    level: [Level; 2],
    caps: Caps,
}

impl Principal {
    fn anonymous() -> Self {
        Self {
            name: "anonymous",
            auth: Auth::Anonymous,
            cred: None,
            bearer: false,
            level: [Level::NoAccess; 2],
            caps: NO_REPO_SCOPES,
        }
    }

    /// A user presenting a personal token (Basic `USER:TOKEN`).
    fn user(name: &'static str, user: &str, token: &str, level: [Level; 2], caps: Caps) -> Self {
        Self {
            name,
            auth: Auth::Valid,
            cred: Some((user.to_owned(), token.to_owned())),
            bearer: false,
            level,
            caps,
        }
    }

    /// An access token (Basic `x-token-auth:TOKEN`, or Bearer on REST).
    fn access(
        name: &'static str,
        token: &Token,
        level: [Level; 2],
        caps: Caps,
        bearer: bool,
    ) -> Self {
        Self {
            name,
            auth: Auth::Valid,
            cred: Some(("x-token-auth".to_owned(), token.secret.clone())),
            bearer,
            level,
            caps,
        }
    }

    /// Credentials that must be refused.
    fn invalid(name: &'static str, user: &str, secret: &str) -> Self {
        Self {
            name,
            auth: Auth::Invalid,
            cred: Some((user.to_owned(), secret.to_owned())),
            bearer: false,
            level: [Level::NoAccess; 2],
            caps: NO_REPO_SCOPES,
        }
    }

    /// A REST request carrying this caller's credentials.
    fn rest<'a>(&self, method: &'a str, path: &'a str) -> HttpRequest<'a> {
        let req = HttpRequest::new(method, path);
        match &self.cred {
            None => req,
            Some((_, secret)) if self.bearer => {
                req.header("Authorization", &format!("Bearer {secret}"))
            }
            Some((user, secret)) => req.header(
                "Authorization",
                &format!("Basic {}", base64(format!("{user}:{secret}").as_bytes())),
            ),
        }
    }

    /// The git URL of `full` with this caller's credentials in it.
    fn url(&self, c: &Cluster, full: &str) -> String {
        match &self.cred {
            None => c.repo_url_anonymous(full),
            Some((user, secret)) => {
                let base = c.http_url();
                let rest = base.strip_prefix("http://").unwrap_or(base);
                format!(
                    "http://{}:{}@{rest}/{full}.git",
                    percent_encode(user),
                    percent_encode(secret)
                )
            }
        }
    }

    /// A git command in `dir` as this caller: credentials, if any, go with
    /// the first request, as a REST client sends them.
    fn git(&self, git: &Git, dir: &Path) -> GitCmd {
        let cmd = git.cmd(dir);
        if self.cred.is_some() {
            cmd.args(PROACTIVE_AUTH)
        } else {
            cmd
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vis {
    Private,
    Public,
}

impl Vis {
    const ALL: [Vis; 2] = [Vis::Private, Vis::Public];

    fn idx(self) -> usize {
        match self {
            Vis::Private => 0,
            Vis::Public => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Vis::Private => "private",
            Vis::Public => "public",
        }
    }
}

/// The operations of the matrix: read (git clone, REST GET), write (git
/// push), admin (REST DELETE).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    GitClone,
    RestGet,
    GitPush,
    RestDelete,
}

impl Op {
    /// In the order they run: deletes last, so that one wrongly allowed on
    /// a fixture repository cannot distort the other columns.
    const ALL: [Op; 4] = [Op::GitClone, Op::RestGet, Op::GitPush, Op::RestDelete];

    fn name(self) -> &'static str {
        match self {
            Op::GitClone => "git clone",
            Op::RestGet => "REST GET",
            Op::GitPush => "git push",
            Op::RestDelete => "REST DELETE",
        }
    }

    fn is_git(self) -> bool {
        matches!(self, Op::GitClone | Op::GitPush)
    }
}

/// An answer, as the caller sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Allowed,
    NotFound,
    Unauthorized,
    Forbidden,
    /// Anything else (a 5xx, an unexpected git message): never expected.
    Other,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "Allowed",
            Outcome::NotFound => "NotFound",
            Outcome::Unauthorized => "Unauthorized",
            Outcome::Forbidden => "Forbidden",
            Outcome::Other => "Other",
        }
    }

    /// A REST answer; `success` is the operation's success status.
    fn of_status(status: u16, success: u16) -> Self {
        match status {
            s if s == success => Outcome::Allowed,
            401 => Outcome::Unauthorized,
            403 => Outcome::Forbidden,
            404 => Outcome::NotFound,
            _ => Outcome::Other,
        }
    }

    /// A git command's result, from its messages: a 403 is "The requested
    /// URL returned error: 403"; a 401 is "Authentication failed" with
    /// credentials, "could not read Username" without (no prompt, no
    /// helper); a 404 is "repository '…' not found".
    fn of_git(o: &GitOutput) -> Self {
        if o.success() {
            return Outcome::Allowed;
        }
        let text = o.all_lower();
        if text.contains("returned error: 403") {
            Outcome::Forbidden
        } else if text.contains("authentication failed")
            || text.contains("could not read username")
            || text.contains("could not read password")
            || text.contains("returned error: 401")
        {
            Outcome::Unauthorized
        } else if text.contains("not found") || text.contains("returned error: 404") {
            Outcome::NotFound
        } else {
            Outcome::Other
        }
    }
}

/// The outcome the rules promise `p` for `op` on the repository of
/// visibility `vis`.
fn expected(p: &Principal, vis: Vis, op: Op) -> Outcome {
    if p.auth == Auth::Invalid {
        return Outcome::Unauthorized;
    }
    let anonymous = p.auth == Auth::Anonymous;
    let public = vis == Vis::Public;
    let level = p.level[vis.idx()];
    // Whoever cannot read gets the answer of a missing repository.
    if !public && level < Level::Read {
        return if anonymous {
            Outcome::Unauthorized
        } else {
            Outcome::NotFound
        };
    }
    let (needed, scoped) = match op {
        // Open to everyone, anonymous included: refusing a token whose
        // scopes lack `repository` would protect nothing.
        Op::GitClone | Op::RestGet if public => return Outcome::Allowed,
        Op::GitClone | Op::RestGet => (Level::Read, p.caps.read),
        Op::GitPush => (Level::Write, p.caps.write),
        Op::RestDelete => (Level::Admin, p.caps.delete),
    };
    if level >= needed && scoped {
        Outcome::Allowed
    } else if anonymous {
        // Anything beyond a public read needs a caller: authenticate.
        Outcome::Unauthorized
    } else {
        // The caller can read already: a refusal reveals nothing.
        Outcome::Forbidden
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// The last line git printed, for the table.
fn git_summary(o: &GitOutput) -> String {
    if o.success() {
        return "ok".to_owned();
    }
    let last = o
        .stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    shorten(last.trim())
}

fn http_summary(r: &HttpResponse) -> String {
    shorten(&format!("HTTP {} {}", r.status, r.text().trim()))
}

fn shorten(s: &str) -> String {
    const MAX: usize = 110;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// Whether this git can send credentials before a 401
/// (`http.proactiveAuth`, git 2.46).
fn git_has_proactive_auth(git: &Git) -> Result<bool> {
    let o = git.cmd(git.home()).arg("--version").ok()?;
    // "git version 2.47.3", possibly with a vendor suffix.
    let v: Vec<u32> = o
        .out()
        .trim_start_matches("git version ")
        .split(|ch: char| !ch.is_ascii_digit())
        .take(2)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    Ok(v.len() == 2 && (v[0], v[1]) >= (2, 46))
}

/// What a caller may hear while a new grant or token is on its way: the
/// answer without it. Only waited through during setup.
const GRANT_PENDING: &[u16] = &[401, 404];

/// Polls `GET /2.0/repositories/FULL` as `p` every 100 ms until it answers
/// `want`, failing on any answer but those of `from` and `want`, or after
/// `timeout`.
/// Returns how long it took.
fn poll_get(
    c: &Cluster,
    p: &Principal,
    full: &str,
    from: &[u16],
    want: u16,
    timeout: Duration,
) -> Result<Duration> {
    let path = format!("/2.0/repositories/{full}");
    let start = Instant::now();
    loop {
        let r = p.rest("GET", &path).send(c.http_url())?;
        if r.status == want {
            return Ok(start.elapsed());
        }
        ensure!(
            from.contains(&r.status),
            "GET {path} as {}: {} {} (expected {from:?} until it turns {want})",
            p.name,
            r.status,
            r.text()
        );
        ensure!(
            start.elapsed() < timeout,
            "GET {path} as {} still answers {from:?} after {timeout:?}",
            p.name
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `text` with the repository's path and slug replaced by placeholders, so
/// that answers naming two different repositories compare.
fn normalize(text: &str, full: &str) -> String {
    let slug = full.rsplit('/').next().unwrap_or(full);
    text.replace(full, "<WS/SLUG>").replace(slug, "<SLUG>")
}

/// A REST answer as far as it may tell repositories apart: status, content
/// type, and the error's `type` and message.
fn rest_fingerprint(r: &HttpResponse, full: &str) -> String {
    let body = match r.json() {
        Ok(v) => format!("type {} message {}", v["type"], v["error"]["message"]),
        Err(_) => format!("non-JSON body {:?}", r.text()),
    };
    normalize(
        &format!(
            "HTTP {} content-type {:?}, {body}",
            r.status,
            r.header("content-type")
        ),
        full,
    )
}

/// A git failure as far as it may tell repositories apart: its class and
/// everything git printed.
fn git_fingerprint(o: &GitOutput, full: &str) -> String {
    normalize(
        &format!("{} | {}", Outcome::of_git(o).name(), o.stderr.trim()),
        full,
    )
}

// ---------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------

/// The cluster state the matrix runs against.
struct Matrix {
    git: Git,
    /// Full names of the [private, public] repositories.
    repos: [String; 2],
    /// A repository of the same workspace that does not exist.
    missing: String,
    /// A local repository holding the seed commit both repositories hold.
    work: Repo,
    seed: String,
    principals: Vec<Principal>,
    /// For each delete expected to succeed, by (principal, visibility
    /// index): a repository of its own to delete, with the same grants.
    throwaway: BTreeMap<(usize, usize), String>,
}

/// Sets up the workspace, its repositories, users, grants and tokens, and
/// waits until every change has had time to reach every process.
fn set_up_matrix(c: &Cluster) -> Result<Matrix> {
    let git = Git::new()?;
    // A workspace of its own: the workspace token reaches nothing else.
    let ws = unique_name("authz");
    let private = format!("{ws}/{}", unique_name("private"));
    let public = format!("{ws}/{}", unique_name("public"));
    let missing = format!("{ws}/{}", unique_name("absent"));
    create_repo_as_admin(c, &private, false)?;
    create_repo_as_admin(c, &public, true)?;
    let (work, seed) = seed_repos(c, &git, &[private.as_str(), public.as_str()])?;

    let nobody = unique_name("nobody");
    let reader = unique_name("reader");
    let writer = unique_name("writer");
    let owner = unique_name("owner");
    for u in [&nobody, &reader, &writer, &owner] {
        add_user(c, u)?;
    }
    // The reader through the workspace; the writer through the workspace
    // (read) and each repository (write): the highest level counts.
    grant(c, &reader, &ws, "read")?;
    grant(c, &writer, &ws, "read")?;
    // Repository grants, given again to each throwaway repository.
    let repo_grants = [(writer.as_str(), "write"), (owner.as_str(), "admin")];
    for full in [&private, &public] {
        for (user, level) in repo_grants {
            grant(c, user, full, level)?;
        }
    }

    let user_token = |u: &str| create_token(c, 'p', &["--user", u]);
    let t_nobody = user_token(nobody.as_str())?;
    let t_reader = user_token(reader.as_str())?;
    let t_writer = user_token(writer.as_str())?;
    let t_owner = user_token(owner.as_str())?;
    let t_account = create_token(c, 'p', &["--user", &writer, "--scope", "account"])?;
    let t_revoked = user_token(owner.as_str())?;
    let t_long = create_token(c, 'p', &["--user", &owner, "--expires-in", "3600"])?;
    let t_expiring = create_token(c, 'p', &["--user", &owner, "--expires-in", "1"])?;
    let expiring_made = Instant::now();
    let t_repo = create_token(
        c,
        'r',
        &["--repository", &private, "--scope", "repository:write"],
    )?;
    let t_ws = create_token(c, 'w', &["--workspace", &ws, "--scope", "repository"])?;

    use Level::{Admin, NoAccess, Read, Write};
    let info = c.info();
    let principals = vec![
        Principal::anonymous(),
        Principal::user(
            "site admin",
            &info.username,
            &info.token,
            [Admin; 2],
            ALL_SCOPES,
        ),
        Principal::user(
            "user without grant",
            &nobody,
            &t_nobody.secret,
            [NoAccess; 2],
            ALL_SCOPES,
        ),
        Principal::user(
            "reader (workspace grant)",
            &reader,
            &t_reader.secret,
            [Read; 2],
            ALL_SCOPES,
        ),
        Principal::user(
            "writer (repo grant)",
            &writer,
            &t_writer.secret,
            [Write; 2],
            ALL_SCOPES,
        ),
        Principal::user(
            "admin (repo grant)",
            &owner,
            &t_owner.secret,
            [Admin; 2],
            ALL_SCOPES,
        ),
        Principal::user(
            "writer, token `account`",
            &writer,
            &t_account.secret,
            [Write; 2],
            NO_REPO_SCOPES,
        ),
        Principal::access(
            "repo token (private, write)",
            &t_repo,
            // Bound to the private repository; elsewhere no grant.
            [Write, NoAccess],
            Caps {
                read: true,
                write: true,
                delete: false,
            },
            false,
        ),
        Principal::access(
            "workspace token (read)",
            &t_ws,
            [Read; 2],
            Caps {
                read: true,
                write: false,
                delete: false,
            },
            // Bearer on REST, to cover that form too.
            true,
        ),
        Principal::invalid("unknown token", "x-token-auth", &unknown_token()),
        // A name with more rights than the token's owner: no escalation.
        Principal::invalid("owner's name, reader's token", &owner, &t_reader.secret),
        Principal::invalid("revoked token", &owner, &t_revoked.secret),
        Principal::invalid("expired token", &owner, &t_expiring.secret),
    ];

    let mut throwaway = BTreeMap::new();
    for (pi, p) in principals.iter().enumerate() {
        for vis in Vis::ALL {
            if expected(p, vis, Op::RestDelete) == Outcome::Allowed {
                let full = format!("{ws}/{}", unique_name("throwaway"));
                create_repo_as_admin(c, &full, vis == Vis::Public)?;
                for (user, level) in repo_grants {
                    grant(c, user, &full, level)?;
                }
                throwaway.insert((pi, vis.idx()), full);
            }
        }
    }

    // The grants are in effect before anything is measured against them.
    for (&(pi, _), full) in &throwaway {
        poll_get(
            c,
            &principals[pi],
            full,
            GRANT_PENDING,
            200,
            Duration::from_secs(10),
        )
        .with_context(|| format!("the grants on {full} take effect"))?;
    }
    // The tokens about to be revoked or to expire did work: their refusal
    // later is theirs, not a broken grant.
    for (what, token) in [
        ("to be revoked", &t_revoked),
        ("expiring in an hour", &t_long),
    ] {
        let p = Principal::user("owner", &owner, &token.secret, [Admin; 2], ALL_SCOPES);
        let r = p
            .rest("GET", &format!("/2.0/repositories/{private}"))
            .send(c.http_url())?;
        ensure!(
            r.status == 200,
            "the owner's token {what} does not work yet: {} {}",
            r.status,
            r.text()
        );
    }
    revoke(c, &t_revoked.secret)?;
    let revoked_at = Instant::now();

    let ready =
        (revoked_at + PROPAGATION).max(expiring_made + Duration::from_secs(1) + PROPAGATION);
    thread::sleep(ready.saturating_duration_since(Instant::now()));
    Ok(Matrix {
        git,
        repos: [private, public],
        missing,
        work,
        seed,
        principals,
        throwaway,
    })
}

/// Findings besides a cell's answer.
#[derive(Default)]
struct Findings {
    problems: Vec<String>,
    /// Cells allowed that should not be, refusals that changed something,
    /// private repositories distinguishable from missing ones.
    leaks: usize,
}

/// One cell: what the rules promise and what happened.
struct Cell {
    principal: &'static str,
    vis: Vis,
    op: Op,
    expected: Outcome,
    /// `None`: the cell cannot apply here (`detail` says why).
    got: Option<Outcome>,
    detail: String,
}

/// Runs one cell as principal `pi` and classifies the answer. Side effects
/// that contradict it (refs moved by a refused push, a repository gone
/// after a refused delete) go to `f`.
fn run_cell(
    c: &Cluster,
    m: &Matrix,
    pi: usize,
    vis: Vis,
    op: Op,
    n: usize,
    f: &mut Findings,
) -> Result<(Outcome, String)> {
    let p = &m.principals[pi];
    let full = m.repos[vis.idx()].as_str();
    let what = format!("{} / {} / {}", p.name, vis.name(), op.name());
    match op {
        Op::GitClone => {
            let dest = m.git.scratch("clone");
            let o = p
                .git(&m.git, m.git.home())
                .args(["clone", "-q"])
                .arg(p.url(c, full))
                .arg(&dest)
                .output()?;
            let got = Outcome::of_git(&o);
            if got == Outcome::Allowed {
                let main = m.git.repo(&dest).rev_parse("refs/remotes/origin/main").ok();
                if main.as_deref() != Some(m.seed.as_str()) {
                    f.problems.push(format!(
                        "{what}: the clone's main is {main:?}, not the seed {}",
                        m.seed
                    ));
                }
            }
            Ok((got, git_summary(&o)))
        }
        Op::RestGet => {
            let path = format!("/2.0/repositories/{full}");
            let r = p.rest("GET", &path).send(c.http_url())?;
            let got = Outcome::of_status(r.status, 200);
            if got == Outcome::Allowed && !r.json().is_ok_and(|v| v["full_name"] == full) {
                f.problems
                    .push(format!("{what}: 200 without {full}'s JSON: {}", r.text()));
            }
            Ok((got, http_summary(&r)))
        }
        Op::GitPush => {
            // A commit nobody pushed yet (a child of the seed whose message
            // names the cell), to a branch of its own.
            let admin_url = c.repo_url(full);
            let before = m.git.remote_refs(&admin_url)?;
            let commit = m.work.run([
                "commit-tree",
                &format!("{}^{{tree}}", m.seed),
                "-p",
                &m.seed,
                "-m",
                &format!("cell {n}"),
            ])?;
            let branch = format!("refs/heads/cell-{n}");
            let o = p
                .git(&m.git, &m.work.path)
                .args(["push", "-q"])
                .arg(p.url(c, full))
                .arg(format!("{commit}:{branch}"))
                .output()?;
            let got = Outcome::of_git(&o);
            let after = m.git.remote_refs(&admin_url)?;
            if got == Outcome::Allowed {
                if after.get(&branch) != Some(&commit) {
                    f.problems.push(format!(
                        "{what}: push accepted but {branch} is {:?}, not {commit}",
                        after.get(&branch)
                    ));
                }
            } else if after != before {
                f.problems.push(format!(
                    "{what}: push refused but the refs changed: {before:?} -> {after:?}"
                ));
                f.leaks += 1;
            }
            Ok((got, git_summary(&o)))
        }
        Op::RestDelete => {
            let (target, is_throwaway) = match m.throwaway.get(&(pi, vis.idx())) {
                Some(t) => (t.as_str(), true),
                None => (full, false),
            };
            let path = format!("/2.0/repositories/{target}");
            let r = p.rest("DELETE", &path).send(c.http_url())?;
            let got = Outcome::of_status(r.status, 204);
            let after = c.request("GET", &path).send(c.http_url())?.status;
            match (got, after) {
                (Outcome::Allowed, 404) | (Outcome::NotFound, 200) => {}
                (Outcome::Unauthorized | Outcome::Forbidden | Outcome::Other, 200) => {}
                (Outcome::Allowed, s) => f.problems.push(format!(
                    "{what}: DELETE answered 204 but {target} still answers {s}"
                )),
                (_, s) => {
                    f.problems.push(format!(
                        "{what}: DELETE refused ({}) but {target} now answers {s}",
                        r.status
                    ));
                    f.leaks += 1;
                }
            }
            if got == Outcome::Allowed && !is_throwaway {
                f.problems.push(format!(
                    "{what}: deleted the {} fixture; later DELETE cells met a missing repository",
                    vis.name()
                ));
            }
            Ok((got, http_summary(&r)))
        }
    }
}

/// How `p`'s answers for the private repository differ from its answers
/// for a missing one once each names its own path (REST GET and `git
/// ls-remote`); empty: indistinguishable. Also returns a summary line.
fn differences_from_missing(
    c: &Cluster,
    m: &Matrix,
    p: &Principal,
) -> Result<(Vec<String>, String)> {
    let private = m.repos[Vis::Private.idx()].as_str();
    let exists = c
        .request("GET", &format!("/2.0/repositories/{private}"))
        .send(c.http_url())?;
    ensure!(
        exists.status == 200,
        "the private repository is gone: {}",
        exists.status
    );
    let mut diffs = Vec::new();
    let mut rest = Vec::new();
    let mut git = Vec::new();
    for full in [private, m.missing.as_str()] {
        let r = p
            .rest("GET", &format!("/2.0/repositories/{full}"))
            .send(c.http_url())?;
        if r.status == 404 {
            // The REST error shape: {"type":"error","error":{"message":…}}.
            let shaped = r.json().is_ok_and(|v| {
                v["type"] == "error"
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|s| !s.is_empty())
            });
            if !shaped {
                diffs.push(format!(
                    "{full}: a 404 not in the error shape: {}",
                    r.text()
                ));
            }
        }
        rest.push(rest_fingerprint(&r, full));
        let o = p
            .git(&m.git, m.git.home())
            .arg("ls-remote")
            .arg(p.url(c, full))
            .output()?;
        if o.success() {
            diffs.push(format!("{full}: git ls-remote succeeded: {}", o.out()));
        }
        git.push(git_fingerprint(&o, full));
    }
    if rest[0] != rest[1] {
        diffs.push(format!(
            "REST: private {:?} vs missing {:?}",
            rest[0], rest[1]
        ));
    }
    if git[0] != git[1] {
        diffs.push(format!("git: private {:?} vs missing {:?}", git[0], git[1]));
    }
    let summary = format!("REST {} | git {}", shorten(&rest[0]), shorten(&git[0]));
    Ok((diffs, summary))
}

/// The matrix as a table, mismatches marked.
fn render(cells: &[Cell]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "   {:<30} {:<8} {:<12} {:<13} {:<13} detail",
        "principal", "repo", "operation", "expected", "got"
    );
    for cell in cells {
        let (got, mark) = match cell.got {
            None => ("n/a", "   "),
            Some(g) if g == cell.expected => (g.name(), "   "),
            Some(g) => (g.name(), "!! "),
        };
        let _ = writeln!(
            t,
            "{mark}{:<30} {:<8} {:<12} {:<13} {:<13} {}",
            cell.principal,
            cell.vis.name(),
            cell.op.name(),
            cell.expected.name(),
            got,
            cell.detail
        );
    }
    t
}

#[test]
fn an_authorization_matrix_leaks_nothing() -> Result<()> {
    // A cluster of its own: the kit does not say the shared one may get
    // users and grants.
    let c = Cluster::start()?;
    let m = set_up_matrix(&c)?;
    let proactive = git_has_proactive_auth(&m.git)?;
    let mut f = Findings::default();

    // A private repository answers like a missing one to whoever cannot
    // read it. Checked first, while the private repository surely exists.
    let mut comparisons = Vec::new();
    for p in &m.principals {
        if !matches!(
            expected(p, Vis::Private, Op::RestGet),
            Outcome::NotFound | Outcome::Unauthorized
        ) {
            continue;
        }
        let (diffs, summary) = differences_from_missing(&c, &m, p)
            .with_context(|| format!("private vs missing as {}", p.name))?;
        f.leaks += diffs.len();
        for d in &diffs {
            f.problems.push(format!(
                "{}: private distinguishable from missing: {d}",
                p.name
            ));
        }
        comparisons.push(format!(
            "{} {:<30} {summary}",
            if diffs.is_empty() {
                "  same"
            } else {
                "!! DIFF"
            },
            p.name
        ));
    }

    let mut cells = Vec::new();
    let mut n = 0;
    for op in Op::ALL {
        for (pi, p) in m.principals.iter().enumerate() {
            for vis in Vis::ALL {
                n += 1;
                let want = expected(p, vis, op);
                if op.is_git() && vis == Vis::Public && p.auth == Auth::Invalid && !proactive {
                    cells.push(Cell {
                        principal: p.name,
                        vis,
                        op,
                        expected: want,
                        got: None,
                        detail: "this git cannot send credentials before a 401 \
                                 (http.proactiveAuth needs git 2.46), so a public \
                                 repository never sees them"
                            .to_owned(),
                    });
                    continue;
                }
                let (got, detail) = run_cell(&c, &m, pi, vis, op, n, &mut f)
                    .with_context(|| format!("{} / {} / {}", p.name, vis.name(), op.name()))?;
                if got == Outcome::Allowed && want != Outcome::Allowed {
                    f.leaks += 1;
                }
                cells.push(Cell {
                    principal: p.name,
                    vis,
                    op,
                    expected: want,
                    got: Some(got),
                    detail,
                });
            }
        }
    }

    println!(
        "authorization matrix ({} cells):\n{}",
        cells.len(),
        render(&cells)
    );
    let skipped: Vec<String> = cells
        .iter()
        .filter(|cell| cell.got.is_none())
        .map(|cell| {
            format!(
                "  {} / {} / {}: {}",
                cell.principal,
                cell.vis.name(),
                cell.op.name(),
                cell.detail
            )
        })
        .collect();
    if skipped.is_empty() {
        println!("cells that cannot apply: none (every principal × repository × operation ran)");
    } else {
        println!("cells that cannot apply:\n{}", skipped.join("\n"));
    }
    println!(
        "private repository vs missing repository, for every principal that cannot read it:\n{}",
        comparisons.join("\n")
    );
    let mismatches: Vec<String> = cells
        .iter()
        .filter_map(|cell| {
            let got = cell.got?;
            (got != cell.expected).then(|| {
                format!(
                    "{} / {} / {}: expected {}, got {} ({})",
                    cell.principal,
                    cell.vis.name(),
                    cell.op.name(),
                    cell.expected.name(),
                    got.name(),
                    cell.detail
                )
            })
        })
        .collect();
    println!(
        "{} mismatching cells, {} other problems, {} leaks",
        mismatches.len(),
        f.problems.len(),
        f.leaks
    );
    ensure!(
        mismatches.is_empty() && f.problems.is_empty() && f.leaks == 0,
        "{} mismatching cells, {} leaks:\n{}\nother problems:\n{}",
        mismatches.len(),
        f.leaks,
        mismatches.join("\n"),
        f.problems.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Revocation
// ---------------------------------------------------------------------------

#[test]
fn revoking_a_token_takes_effect_within_seconds() -> Result<()> {
    let c = Cluster::start()?;
    let git = Git::new()?;
    let full = format!("{}/{}", unique_name("authz-revoke"), unique_name("private"));
    create_repo_as_admin(&c, &full, false)?;
    let (_, seed) = seed_repos(&c, &git, &[full.as_str()])?;
    let user = unique_name("reader");
    add_user(&c, &user)?;
    grant(&c, &user, &full, "read")?;
    let token = create_token(&c, 'p', &["--user", &user])?;
    let other = create_token(&c, 'p', &["--user", &user])?;
    let read = [Level::Read; 2];
    let p = Principal::user("reader", &user, &token.secret, read, ALL_SCOPES);
    let q = Principal::user(
        "reader, second token",
        &user,
        &other.secret,
        read,
        ALL_SCOPES,
    );
    for who in [&p, &q] {
        poll_get(&c, who, &full, GRANT_PENDING, 200, Duration::from_secs(10))
            .context("the read grant takes effect")?;
    }
    let dest = git.scratch("clone");
    p.git(&git, git.home())
        .args(["clone", "-q"])
        .arg(p.url(&c, &full))
        .arg(&dest)
        .ok()?;
    let main = git.repo(&dest).rev_parse("refs/remotes/origin/main")?;
    ensure!(
        main == seed,
        "the clone's main is {main}, not the seed {seed}"
    );

    // Once by the whole secret, once by the id part alone.
    for (who, arg, how) in [
        (&p, token.secret.as_str(), "whole secret"),
        (&q, other.id(), "id part"),
    ] {
        let start = Instant::now();
        revoke(&c, arg)?;
        let cli = start.elapsed();
        let took = poll_get(&c, who, &full, &[200], 401, Duration::from_secs(5))
            .with_context(|| format!("revoked by its {how}"))?;
        println!(
            "revoked by its {how}: the CLI took {cli:?}; REST answered 401 {took:?} after it \
             returned ({:?} in all)",
            cli + took
        );
        ensure!(
            took < Duration::from_secs(3),
            "revoked by its {how}: still accepted for {took:?}"
        );
        let o = who
            .git(&git, git.home())
            .arg("ls-remote")
            .arg(who.url(&c, &full))
            .output()?;
        ensure!(
            Outcome::of_git(&o) == Outcome::Unauthorized,
            "git with a token revoked by its {how}: {o}"
        );
        if how == "whole secret" {
            // Only that token: the user's other one still works.
            let r = q
                .rest("GET", &format!("/2.0/repositories/{full}"))
                .send(c.http_url())?;
            ensure!(
                r.status == 200,
                "revoking one token refused another: {} {}",
                r.status,
                r.text()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Secrets at rest
// ---------------------------------------------------------------------------

/// Byte strings to look for, all found in one pass over each file.
struct Needles {
    items: Vec<(String, Vec<u8>)>,
    /// Whether some needle starts with these two bytes: a cheap filter, as
    /// the data folder holds megabytes and tests build without
    /// optimisation.
    starts: Vec<bool>,
}

impl Needles {
    fn new(items: Vec<(String, Vec<u8>)>) -> Self {
        let mut starts = vec![false; 1 << 16];
        for (_, n) in &items {
            if let [a, b, ..] = n.as_slice() {
                starts[(usize::from(*a) << 8) | usize::from(*b)] = true;
            }
        }
        Self { items, starts }
    }

    /// Indexes of the needles `hay` holds.
    fn found_in(&self, hay: &[u8]) -> BTreeSet<usize> {
        let mut found = BTreeSet::new();
        for i in 0..hay.len().saturating_sub(1) {
            if !self.starts[(usize::from(hay[i]) << 8) | usize::from(hay[i + 1])] {
                continue;
            }
            for (k, (_, n)) in self.items.iter().enumerate() {
                if hay[i..].starts_with(n) {
                    found.insert(k);
                }
            }
        }
        found
    }
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    ensure!(s.len().is_multiple_of(2), "odd hex length: {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("bad hex {s:?}")))
        .collect()
}

/// The forms a token's secret could take if written in clear: its hex in
/// either case, its raw bytes (and their base64), and the Basic header
/// value of each user name it was sent with.
fn secret_needles(label: &str, token: &Token, users: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let hex = token.secret_hex();
    let raw = hex_decode(hex)?;
    let mut v = vec![
        (
            format!("{label}: secret (hex)"),
            hex.to_lowercase().into_bytes(),
        ),
        (
            format!("{label}: secret (HEX)"),
            hex.to_uppercase().into_bytes(),
        ),
        (format!("{label}: secret (raw bytes)"), raw.clone()),
        (
            format!("{label}: secret (base64 of the bytes)"),
            base64(&raw).trim_end_matches('=').as_bytes().to_vec(),
        ),
    ];
    for user in users {
        v.push((
            format!("{label}: Basic header value as {user}"),
            base64(format!("{user}:{}", token.secret).as_bytes())
                .trim_end_matches('=')
                .as_bytes()
                .to_vec(),
        ));
    }
    Ok(v)
}

/// Every regular file under `dir`, recursively; symlinks are not followed
/// and folders that vanish while listed (RocksDB deletes old files) are
/// skipped.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("list {}", d.display())),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` is one of the processes' logs (not RocksDB's files).
fn is_log(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "logs")
        || path.file_name().is_some_and(|n| n == "cairn.log")
}

/// What one scan of the cluster's files found.
#[derive(Default)]
struct Scan {
    files: usize,
    bytes: u64,
    log_files: usize,
    log_bytes: u64,
    /// (needle label, file) for every needle found.
    hits: Vec<(String, PathBuf)>,
}

fn scan(root: &Path, needles: &Needles) -> Result<Scan> {
    let mut s = Scan::default();
    for path in files_under(root)? {
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        s.files += 1;
        s.bytes += data.len() as u64;
        if is_log(&path) {
            s.log_files += 1;
            s.log_bytes += data.len() as u64;
        }
        for k in needles.found_in(&data) {
            s.hits.push((needles.items[k].0.clone(), path.clone()));
        }
    }
    Ok(s)
}

/// The folder holding everything the cluster wrote: the kit keeps the data
/// folder and `cairn dev`'s own log (`cairn.log`) together in a temp dir of
/// the cluster's own (`cairn-e2e-*`). Anything else: the data folder alone.
fn cluster_root(c: &Cluster) -> PathBuf {
    match c.data_dir().parent() {
        Some(p)
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cairn-e2e-")) =>
        {
            p.to_path_buf()
        }
        _ => c.data_dir().to_path_buf(),
    }
}

#[test]
fn secrets_never_appear_in_clear_on_disk_or_in_logs() -> Result<()> {
    let mut c = Cluster::start()?;
    let git = Git::new()?;
    let ws = unique_name("authz-secrets");
    let full = format!("{ws}/{}", unique_name("private"));
    create_repo_as_admin(&c, &full, false)?;
    let (work, seed) = seed_repos(&c, &git, &[full.as_str()])?;
    let user = unique_name("holder");
    add_user(&c, &user)?;
    grant(&c, &user, &ws, "write")?;
    let personal = create_token(&c, 'p', &["--user", &user])?;
    let repo_token = create_token(&c, 'r', &["--repository", &full])?;
    let ws_token = create_token(&c, 'w', &["--workspace", &ws])?;
    let write = [Level::Write; 2];
    let callers = [
        Principal::user("personal token", &user, &personal.secret, write, ALL_SCOPES),
        Principal::access("repository token", &repo_token, write, ALL_SCOPES, false),
        Principal::access("workspace token", &ws_token, write, ALL_SCOPES, true),
    ];

    // Each token used once over REST and git (the personal one pushes too),
    // so that every path that sees a secret has seen it.
    for p in &callers {
        poll_get(&c, p, &full, GRANT_PENDING, 200, Duration::from_secs(10))
            .with_context(|| format!("{} reads {full}", p.name))?;
        p.git(&git, git.home())
            .arg("ls-remote")
            .arg(p.url(&c, &full))
            .ok()?;
    }
    let commit = work.run([
        "commit-tree",
        &format!("{seed}^{{tree}}"),
        "-p",
        &seed,
        "-m",
        "pushed",
    ])?;
    callers[0]
        .git(&git, &work.path)
        .args(["push", "-q"])
        .arg(callers[0].url(&c, &full))
        .arg(format!("{commit}:refs/heads/pushed"))
        .ok()?;
    // One revoked, then presented again: refusals must not log it either.
    revoke(&c, &ws_token.secret)?;
    poll_get(&c, &callers[2], &full, &[200], 401, Duration::from_secs(5))?;
    let o = callers[2]
        .git(&git, git.home())
        .arg("ls-remote")
        .arg(callers[2].url(&c, &full))
        .output()?;
    ensure!(Outcome::of_git(&o) == Outcome::Unauthorized, "{o}");

    let mut items = Vec::new();
    items.extend(secret_needles(
        "personal token",
        &personal,
        &[user.as_str()],
    )?);
    items.extend(secret_needles(
        "repository token",
        &repo_token,
        &["x-token-auth"],
    )?);
    items.extend(secret_needles(
        "revoked workspace token",
        &ws_token,
        &["x-token-auth"],
    )?);
    // The scan's own check: the workspace name is stored in clear, so a
    // scan that cannot see it proves nothing.
    const CONTROL: &str = "control: workspace name";
    items.push((CONTROL.to_owned(), ws.as_bytes().to_vec()));
    let needles = Needles::new(items);

    // Every file, the admin's `dev-token` and `dev-cluster.json` included:
    // only the test's tokens are looked for, never the admin's.
    let root = cluster_root(&c);
    let running = scan(&root, &needles)?;
    // Stopped, the processes have flushed their logs and RocksDB its
    // memtables. RocksDB may compress the blocks it flushes (and shares key
    // prefixes), so a string can hide there: the scan while running, when
    // recent writes sit uncompressed in the write-ahead logs, is the one
    // the control is checked on.
    c.stop();
    let stopped = scan(&root, &needles)?;

    let mut leaks = Vec::new();
    for (when, s) in [("running", &running), ("stopped", &stopped)] {
        println!(
            "{when}: scanned {} files ({} bytes) under {}, of them {} logs ({} bytes)",
            s.files,
            s.bytes,
            root.display(),
            s.log_files,
            s.log_bytes
        );
        for (label, path) in &s.hits {
            if label == CONTROL {
                continue;
            }
            leaks.push(format!("{when}: {label} in {}", path.display()));
        }
    }
    let control: Vec<&PathBuf> = running
        .hits
        .iter()
        .filter(|(label, path)| label == CONTROL && !is_log(path))
        .map(|(_, path)| path)
        .collect();
    println!("the workspace name, found outside the logs while running, in: {control:?}");
    let control_stopped = stopped
        .hits
        .iter()
        .filter(|(label, path)| label == CONTROL && !is_log(path))
        .count();
    println!("…and in {control_stopped} such files once stopped");
    ensure!(
        !control.is_empty(),
        "the scan did not find the workspace name {ws:?} in the data folder: it cannot be \
         trusted to find a secret either"
    );
    ensure!(
        running.log_bytes > 0 && stopped.log_bytes > 0,
        "no log was scanned (running: {} files, stopped: {} files)",
        running.log_files,
        stopped.log_files
    );
    ensure!(
        leaks.is_empty(),
        "secrets in clear on disk:\n{}",
        leaks.join("\n")
    );
    Ok(())
}
