//! Git over SSH: the router's SSH server (russh), for the stock OpenSSH
//! client.
//!
//! A connection authenticates by public key only: a user's key acts as
//! the user, a deploy key reads its one repository; an unknown key gets
//! "Permission denied (publickey)". A session channel may run exactly one
//! of git's two commands (`git-upload-pack` or `git-receive-pack` with the
//! path quoted as git quotes it); a shell, port forwarding or agent
//! forwarding is refused. The command is authorized like an HTTP request
//! (a private repository the key cannot read is "not found"), then served
//! by the same storage-node RPCs: the advertisement first, then the rest
//! of the conversation streamed both ways (`full_duplex` for upload-pack).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use cairn_client::Attempt;
use cairn_identity::{Action, KeyOwner, Principal, Scope};
use cairn_proto::git::git_client::GitClient;
use cairn_proto::git::{AdvertiseRefsRequest, GitService, RepoPath, UploadPackRequest};
use futures::StreamExt;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Handler, Msg, Server, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::authz::{self, Caller, Style};
use crate::state::AppState;

/// A pause in a push's input after which what came so far is sent: git
/// waits for the report after a push without a pack, its input still open.
const PUSH_IDLE: Duration = Duration::from_millis(50);

/// Longest exec command accepted (git's are short).
const MAX_COMMAND: usize = 4096;

/// Loads the host key at `path`, generating an ed25519 key there (mode
/// 0600) on first use.
pub fn host_key(path: &Path) -> std::io::Result<PrivateKey> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_openssh(text.as_bytes()).map_err(std::io::Error::other);
    }
    let seed = cairn_identity::token::random_bytes::<32>();
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(std::io::Error::other)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(key)
}

/// Serves SSH on `listener` until the process ends.
pub async fn serve(listener: TcpListener, key: PrivateKey, state: AppState) -> std::io::Result<()> {
    let config = Arc::new(russh::server::Config {
        keys: vec![key],
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(600)),
        max_auth_attempts: 10,
        nodelay: true,
        ..Default::default()
    });
    let mut server = SshServer { state };
    server.run_on_socket(config, &listener).await
}

struct SshServer {
    state: AppState,
}

impl Server for SshServer {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        Connection {
            state: self.state.clone(),
            from: peer.map(|p| p.ip().to_string()).unwrap_or_default(),
            principal: None,
            channels: HashMap::new(),
            protocol: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// One SSH connection.
pub struct Connection {
    state: AppState,
    from: String,
    principal: Option<Principal>,
    /// Open session channels not yet running a command.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// `GIT_PROTOCOL` per channel, as the client set it.
    protocol: Arc<Mutex<HashMap<ChannelId, String>>>,
}

/// A parsed exec request.
#[derive(Debug, PartialEq, Eq)]
struct GitCommand {
    service: GitService,
    workspace: String,
    slug: String,
}

/// Undoes git's shell quoting of one argument (`'…'`, with `'\''` for a
/// quote and `'\!'` for `!`); a bare word passes as is.
fn unquote(arg: &str) -> Option<String> {
    if !arg.starts_with('\'') {
        let plain = arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        return plain.then(|| arg.to_owned());
    }
    let mut out = String::new();
    let mut rest = arg;
    while let Some(r) = rest.strip_prefix('\'') {
        let end = r.find('\'')?;
        out.push_str(&r[..end]);
        rest = &r[end + 1..];
        if let Some(r) = rest.strip_prefix("\\'") {
            out.push('\'');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("\\!") {
            out.push('!');
            rest = r;
        } else if rest.is_empty() {
            return Some(out);
        } else {
            return None;
        }
    }
    None
}

/// `git-upload-pack 'ws/repo.git'` (or `git upload-pack …`, a leading
/// `/`, no `.git`) into what to run where.
fn parse_command(command: &str) -> Option<GitCommand> {
    let command = command.trim();
    let (name, arg) = if let Some(rest) = command.strip_prefix("git ") {
        rest.trim_start().split_once(' ')?
    } else {
        command.split_once(' ')?
    };
    let service = match name.trim_start_matches("git-") {
        "upload-pack" => GitService::UploadPack,
        "receive-pack" => GitService::ReceivePack,
        _ => return None,
    };
    let path = unquote(arg.trim())?;
    let path = path.trim_start_matches('/').trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let (workspace, slug) = path.split_once('/')?;
    if workspace.is_empty() || slug.is_empty() || slug.contains('/') {
        return None;
    }
    Some(GitCommand {
        service,
        workspace: workspace.to_owned(),
        slug: slug.to_owned(),
    })
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, _user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let index = self.state.identities.index();
        let principal = match index.ssh_keys.get(&fingerprint).map(|k| &k.owner) {
            Some(KeyOwner::User(u)) if index.user(u).is_some() => Principal::User {
                username: u.clone(),
                scopes: None,
                token: None,
            },
            Some(KeyOwner::Deploy { workspace, slug }) => Principal::Repository {
                workspace: workspace.clone(),
                slug: slug.clone(),
                scopes: vec![Scope::Repository],
                token: format!("deploy-key:{fingerprint}"),
            },
            _ => {
                self.state
                    .identities
                    .record(cairn_identity::change::AuditEvent {
                        seq: 0,
                        at: crate::identity::now(),
                        actor: String::new(),
                        from: self.from.clone(),
                        action: "signin:failed".into(),
                        target: fingerprint,
                        detail: "ssh key".into(),
                    });
                return Ok(Auth::reject());
            }
        };
        self.principal = Some(principal);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.channels.len() >= 8 {
            return Ok(false);
        }
        self.channels.insert(channel.id(), channel);
        Ok(true)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "GIT_PROTOCOL" && value.len() <= 256 {
            self.protocol
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(channel, value.to_owned());
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(
            channel,
            session,
            "Cairn provides no shell; use git (git clone ssh://…) over this port.",
        )
        .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(channel, session, "Cairn serves only git over SSH.")
            .await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = std::str::from_utf8(data)
            .ok()
            .filter(|c| c.len() <= MAX_COMMAND);
        let Some(cmd) = command.and_then(parse_command) else {
            let shown: String = String::from_utf8_lossy(data).chars().take(80).collect();
            return self
                .refuse(
                    channel,
                    session,
                    &format!(
                        "Cairn runs only git-upload-pack and git-receive-pack, not {shown:?}."
                    ),
                )
                .await;
        };
        let Some(principal) = self.principal.clone() else {
            return self.refuse(channel, session, "not authenticated").await;
        };
        let Some(ch) = self.channels.remove(&channel) else {
            return Ok(());
        };
        session.channel_success(channel)?;
        let caller = Caller {
            principal,
            from: self.from.clone(),
        };
        let protocol = self
            .protocol
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&channel)
            .unwrap_or_default();
        let state = self.state.clone();
        tokio::spawn(async move {
            run(state, caller, cmd, protocol, ch).await;
        });
        Ok(())
    }
}

impl Connection {
    /// Writes `message` to the channel's stderr and ends it with status 1;
    /// nothing runs.
    async fn refuse(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
        message: &str,
    ) -> Result<(), russh::Error> {
        // Accepted only so that the client shows why, then ended with
        // status 1: a refused request would hide the message.
        session.channel_success(channel)?;
        if let Some(ch) = self.channels.remove(&channel) {
            let _ = ch.extended_data(1, format!("{message}\n").as_bytes()).await;
            let _ = ch.exit_status(1).await;
            let _ = ch.eof().await;
            let _ = ch.close().await;
        }
        Ok(())
    }
}

/// Runs one git command on `channel`, ending it with git's exit status.
async fn run(
    state: AppState,
    caller: Caller,
    cmd: GitCommand,
    protocol: String,
    channel: Channel<Msg>,
) {
    let (read, write) = channel.split();
    let mut stdout = write.make_writer();
    let mut stderr = write.make_writer_ext(Some(1));
    let action = match cmd.service {
        GitService::ReceivePack => Action::Write,
        _ => Action::Read,
    };
    let status = match authz::authorize(
        &state,
        &caller,
        &cmd.workspace,
        &cmd.slug,
        action,
        Style::Git,
    )
    .await
    {
        Err(resp) => {
            let message = match resp.status().as_u16() {
                404 | 401 => "ERROR: Repository not found.".to_owned(),
                403 => "ERROR: You may not push to this repository.".to_owned(),
                _ => "ERROR: Storage temporarily unavailable, try again.".to_owned(),
            };
            let _ = stderr.write_all(format!("{message}\n").as_bytes()).await;
            1
        }
        Ok(_) => match converse(&state, &caller, &cmd, &protocol, read, &mut stdout).await {
            Ok(()) => 0,
            Err(message) => {
                let _ = stderr
                    .write_all(format!("ERROR: {message}\n").as_bytes())
                    .await;
                1
            }
        },
    };
    let _ = stdout.flush().await;
    let _ = stderr.flush().await;
    drop((stdout, stderr));
    let _ = write.exit_status(status).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}

/// The client's bytes, as a stream, until it sends EOF.
fn client_bytes(read: ChannelReadHalf) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::unfold(read, |mut read| async move {
        loop {
            match read.wait().await? {
                ChannelMsg::Data { data } => return Some((Bytes::copy_from_slice(&data), read)),
                ChannelMsg::Eof | ChannelMsg::Close => return None,
                _ => continue,
            }
        }
    })
}

/// The advertisement, then the rest of the conversation.
async fn converse(
    state: &AppState,
    caller: &Caller,
    cmd: &GitCommand,
    protocol: &str,
    read: ChannelReadHalf,
    stdout: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<(), String> {
    let repo = RepoPath {
        workspace: cmd.workspace.clone(),
        slug: cmd.slug.clone(),
    };
    // The advertisement, from the leader for a push (as over HTTP).
    let advert = AdvertiseRefsRequest {
        repo: Some(repo.clone()),
        service: cmd.service as i32,
        git_protocol: protocol.to_owned(),
    };
    let advertise = |ch| {
        let req = advert.clone();
        async move {
            Ok(GitClient::new(ch)
                .max_decoding_message_size(16 << 20)
                .advertise_refs(req)
                .await?
                .into_inner())
        }
    };
    let mut adverts = match cmd.service {
        GitService::ReceivePack => state.cluster.call(&cmd.workspace, advertise).await,
        _ => state.cluster.call_read(&cmd.workspace, advertise).await,
    }
    .map_err(|s| s.message().to_owned())?;
    while let Some(chunk) = adverts.next().await {
        let chunk = chunk.map_err(|s| s.message().to_owned())?;
        stdout
            .write_all(&chunk.data)
            .await
            .map_err(|e| e.to_string())?;
    }
    stdout.flush().await.map_err(|e| e.to_string())?;

    // The rest of the conversation. A push goes the way an HTTP push goes
    // (a bounded prefix read ahead, so a refusal before the node acted can
    // be resent to the leader); a fetch is one attempt, since the client's
    // negotiation cannot be sent twice.
    let mut output = match cmd.service {
        GitService::ReceivePack => {
            let actor = authz::actor_metadata(caller);
            crate::git_http::forward_push(
                state,
                repo,
                protocol.to_owned(),
                Box::pin(client_bytes(read)),
                actor,
                Some(PUSH_IDLE),
            )
            .await
        }
        _ => {
            let input = Mutex::new(Some(client_bytes(read)));
            state
                .cluster
                .call_read(&cmd.workspace, |ch| {
                    let first = UploadPackRequest {
                        repo: Some(repo.clone()),
                        git_protocol: protocol.to_owned(),
                        data: Bytes::new(),
                        full_duplex: true,
                    };
                    let body = input.lock().unwrap_or_else(PoisonError::into_inner).take();
                    async move {
                        let Some(body) = body else {
                            return Err(Attempt::mutation(tonic::Status::unavailable(
                                "the fetch cannot be resent",
                            )));
                        };
                        let stream = futures::stream::iter([first]).chain(body.map(|data| {
                            UploadPackRequest {
                                data,
                                ..Default::default()
                            }
                        }));
                        GitClient::new(ch)
                            .max_decoding_message_size(16 << 20)
                            .upload_pack(stream)
                            .await
                            .map(tonic::Response::into_inner)
                            .map_err(Attempt::mutation)
                    }
                })
                .await
        }
    }
    .map_err(|s| s.message().to_owned())?;
    while let Some(chunk) = output.next().await {
        let chunk = chunk.map_err(|s| s.message().to_owned())?;
        stdout
            .write_all(&chunk.data)
            .await
            .map_err(|e| e.to_string())?;
        stdout.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gits_commands_and_quoting() {
        let want = |service, ws: &str, slug: &str| {
            Some(GitCommand {
                service,
                workspace: ws.into(),
                slug: slug.into(),
            })
        };
        assert_eq!(
            parse_command("git-upload-pack '/ws/repo.git'"),
            want(GitService::UploadPack, "ws", "repo")
        );
        assert_eq!(
            parse_command("git-receive-pack 'ws/repo'"),
            want(GitService::ReceivePack, "ws", "repo")
        );
        assert_eq!(
            parse_command("git upload-pack 'ws/it'\\''s.git'"),
            want(GitService::UploadPack, "ws", "it's")
        );
        for bad in [
            "sh -c id",
            "git-upload-archive 'ws/repo.git'",
            "git-upload-pack 'ws/repo.git",
            "git-upload-pack 'a/b/c.git'",
            "git-upload-pack ws/repo;id",
            "git-upload-pack",
        ] {
            assert_eq!(parse_command(bad), None, "{bad}");
        }
    }
}
