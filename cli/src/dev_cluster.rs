//! `cairn dev --nodes N` (N > 1): a local replicated cluster as separate OS
//! processes — N `cairn node` processes hosting `--shards` shards, each
//! replicated on three of them (the meta group on the first three), and one
//! `cairn router` — each with its own config file, so a test or an operator
//! can kill one and start it again with the same config. Nothing is
//! restarted automatically.
//!
//! On a data folder that already holds a cluster, a larger `--nodes` grows
//! it: the new nodes start empty (no shards in their config, the
//! cluster's meta nodes to reach the directory) and are registered with
//! `AddNode`; `cairn shard rebalance` then gives them replicas.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::dev::{write_private, DevArgs, DevCluster, DevNode, DevProcess, CLUSTER_FILE};

/// Replicas of each dev shard (fewer only on a two-node cluster).
const DEV_REPLICATION: usize = 3;

/// `cairn dev`: prepares the data folder, then runs the cluster.
pub async fn start(args: DevArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let _ = std::fs::remove_file(data_dir.join(CLUSTER_FILE));
    run(
        &data_dir,
        args.http,
        args.nodes,
        args.shards,
        args.fault_injection,
    )
    .await
}

/// The first layout: shard `i` (from 1) on three consecutive nodes,
/// starting at node `i`, so shards spread evenly.
pub fn dev_layout(nodes: &[u64], shards: u64) -> Vec<(u64, Vec<u64>)> {
    let rf = DEV_REPLICATION.min(nodes.len());
    (1..=shards)
        .map(|id| {
            let start = (id as usize - 1) % nodes.len();
            let mut replicas: Vec<u64> =
                (0..rf).map(|k| nodes[(start + k) % nodes.len()]).collect();
            replicas.sort_unstable();
            (id, replicas)
        })
        .collect()
}

/// A free port on 127.0.0.1, chosen once and then kept in the config files
/// so restarts reuse it.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Reads the address a previous run wrote into `config`, if any.
fn remembered_addr(config: &Path, key: &str) -> Option<SocketAddr> {
    let text = fs::read_to_string(config).ok()?;
    let value: toml::Value = toml::from_str(&text).ok()?;
    value.get(key)?.as_str()?.parse().ok()
}

/// What node `id` of this folder recorded: `None` if it never ran (or its
/// record is unreadable), else the meta nodes it last knew (may be empty).
fn recorded_meta(data_dir: &Path, id: u64) -> Option<Vec<u64>> {
    cairn_storage_node::host::recorded_meta_nodes(&data_dir.join(format!("node-{id}")))
        .ok()
        .flatten()
}

pub fn node_config(
    data_dir: &Path,
    id: u64,
    addr: SocketAddr,
    peers: &[(u64, SocketAddr)],
    layout: &[(u64, Vec<u64>)],
    meta: &[u64],
    fault_injection: bool,
) -> String {
    let mut peer_lines = String::new();
    for (pid, paddr) in peers {
        peer_lines.push_str(&format!("{pid} = \"{paddr}\"\n"));
    }
    let mut shard_lines = String::new();
    for (shard, replicas) in layout {
        let list: Vec<String> = replicas.iter().map(u64::to_string).collect();
        shard_lines.push_str(&format!(
            "\n[[shards.shards]]\nid = {shard}\nreplicas = [{}]\n",
            list.join(", ")
        ));
    }
    let meta: Vec<String> = meta.iter().map(u64::to_string).collect();
    let rf = DEV_REPLICATION.min(peers.len());
    format!(
        "# Written by `cairn dev`; edit with care, the cluster keeps these addresses.\n\
         data-dir = \"{data}\"\n\
         grpc-addr = \"{addr}\"\n\
         {faults}\n\
         [shards]\n\
         node-id = {id}\n\
         replication-factor = {rf}\n\
         meta = [{meta}]\n\n\
         [shards.peers]\n\
         {peer_lines}\
         {shard_lines}",
        data = data_dir.display(),
        faults = if fault_injection {
            "fault-injection = true\n"
        } else {
            ""
        },
        meta = meta.join(", "),
    )
}

fn router_config(
    http: SocketAddr,
    ssh: SocketAddr,
    host_key: &Path,
    nodes: &[(u64, SocketAddr)],
) -> String {
    let urls: Vec<String> = nodes
        .iter()
        .map(|(_, a)| format!("\"http://{a}\""))
        .collect();
    format!(
        "# Written by `cairn dev`.\n\
         http-addr = \"{http}\"\n\
         storage-node = {first}\n\
         storage-nodes = [{all}]\n\
         ssh-addr = \"{ssh}\"\n\
         ssh-host-key = \"{key}\"\n",
        key = host_key.display(),
        first = urls[0],
        all = urls.join(", "),
    )
}

fn spawn(exe: &Path, args: &[&str], log: &Path) -> Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

/// Waits until `addr` accepts TCP connections or `child` exits.
fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            // The process says why on its last line ("Error: ...").
            let why = fs::read_to_string(log)
                .ok()
                .and_then(|text| {
                    text.lines()
                        .rev()
                        .find(|l| l.starts_with("Error: "))
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            bail!(
                "process exited ({status}) before listening on {addr}; see {}\n{why}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {addr} after 30 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster's processes; all are stopped when this drops, so a failed
/// start or Ctrl-C leaves nothing running.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Registers node `id` at `addr` through any of `contacts`, retrying while
/// the directory elects its leader after the restart.
async fn register(id: u64, addr: SocketAddr, contacts: &[SocketAddr]) -> Result<()> {
    use cairn_proto::cluster::cluster_client::ClusterClient;
    use cairn_proto::cluster::AddNodeRequest;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::from("no existing node to ask");
    loop {
        for contact in contacts {
            let attempt = async {
                let mut client = ClusterClient::connect(format!("http://{contact}"))
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .add_node(AddNodeRequest {
                        id,
                        addr: addr.to_string(),
                    })
                    .await
                    .map_err(|s| s.message().to_owned())
            };
            match attempt.await {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{contact}: {e}"),
            }
        }
        if Instant::now() > deadline {
            bail!("no node accepted it within 60 s ({last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts the processes, writes `dev-cluster.json`, waits for Ctrl-C.
pub async fn run(
    data_dir: &Path,
    http: SocketAddr,
    nodes: u64,
    shards: u64,
    fault_injection: bool,
) -> Result<()> {
    let exe = std::env::current_exe().context("locating the cairn binary")?;
    let logs = data_dir.join("logs");
    fs::create_dir_all(&logs)?;

    let mut addrs = Vec::new();
    for id in 1..=nodes {
        let cfg = data_dir.join(format!("node-{id}.toml"));
        let addr = match remembered_addr(&cfg, "grpc-addr") {
            Some(a) => a,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        addrs.push((id, addr));
    }
    let router_cfg = data_dir.join("router.toml");
    let http = if http.port() == 0 {
        remembered_addr(&router_cfg, "http-addr")
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
    } else {
        http
    };

    let ids: Vec<u64> = addrs.iter().map(|(id, _)| *id).collect();
    let old: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| recorded_meta(data_dir, *id).is_some())
        .collect();
    // A grown cluster: the nodes that never ran join the existing one.
    let joining: Vec<u64> = if old.is_empty() {
        Vec::new()
    } else {
        ids.iter().copied().filter(|id| !old.contains(id)).collect()
    };
    let left_out: Vec<u64> = (nodes + 1..)
        .take_while(|id| data_dir.join(format!("node-{id}.toml")).exists())
        .collect();
    if !left_out.is_empty() {
        eprintln!(
            "warning: nodes {left_out:?} of this folder are not started (--nodes {nodes}); \
             replicas they hold are unavailable"
        );
    }
    let layout = dev_layout(&ids, shards);
    let first_meta: Vec<u64> = ids.iter().copied().take(DEV_REPLICATION).collect();
    let joiner_meta: Vec<u64> = old
        .iter()
        .find_map(|id| recorded_meta(data_dir, *id).filter(|m| !m.is_empty()))
        .unwrap_or_else(|| old.iter().copied().take(DEV_REPLICATION).collect());
    let mut children = Processes(Vec::new());
    let mut dev_nodes = Vec::new();
    for &(id, addr) in &addrs {
        let node_dir = data_dir.join(format!("node-{id}"));
        let cfg: PathBuf = data_dir.join(format!("node-{id}.toml"));
        let config = if joining.contains(&id) {
            // Empty: no first layout, and never a meta member of its own.
            let meta: Vec<u64> = joiner_meta
                .iter()
                .copied()
                .filter(|m| *m != id && ids.contains(m))
                .collect();
            node_config(&node_dir, id, addr, &addrs, &[], &meta, fault_injection)
        } else {
            node_config(
                &node_dir,
                id,
                addr,
                &addrs,
                &layout,
                &first_meta,
                fault_injection,
            )
        };
        write_private(&cfg, config.as_bytes())?;
        let log = logs.join(format!("node-{id}.log"));
        let child = spawn(&exe, &["node", "--config", &cfg.to_string_lossy()], &log)?;
        dev_nodes.push(DevNode {
            id,
            grpc_addr: addr,
            pid: child.id(),
            data_dir: node_dir,
            config: Some(cfg),
        });
        children.0.push(child);
    }
    let ssh = match remembered_addr(&router_cfg, "ssh-addr") {
        Some(a) => a,
        None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    };
    let host_key = data_dir.join("ssh_host_ed25519_key");
    write_private(
        &router_cfg,
        router_config(http, ssh, &host_key, &addrs).as_bytes(),
    )?;
    let router_log = logs.join("router.log");
    let router = spawn(
        &exe,
        &["router", "--config", &router_cfg.to_string_lossy()],
        &router_log,
    )?;
    let router_pid = router.id();
    children.0.push(router);

    for (i, (_, addr)) in addrs.iter().enumerate() {
        let log = logs.join(format!("node-{}.log", i + 1));
        wait_listening(*addr, &mut children.0[i], &log)?;
    }
    let last = children.0.len() - 1;
    wait_listening(http, &mut children.0[last], &router_log)?;
    wait_listening(ssh, &mut children.0[last], &router_log)?;

    for id in &joining {
        let addr = addrs
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, a)| *a)
            .context("joining node's address")?;
        let contacts: Vec<SocketAddr> = addrs
            .iter()
            .filter(|(i, _)| old.contains(i))
            .map(|(_, a)| *a)
            .collect();
        register(*id, addr, &contacts)
            .await
            .with_context(|| format!("registering node {id} with the cluster"))?;
        println!(
            "node {id} joined the cluster empty; `cairn shard rebalance --data-dir {}` gives it replicas",
            data_dir.display()
        );
    }

    let token = ensure_admin(data_dir, &addrs, http)
        .await
        .context("setting up the admin user")?;
    let http_url = format!("http://{http}");
    let cluster = DevCluster {
        ssh_url: format!("ssh://git@{ssh}"),
        http_url: http_url.clone(),
        username: ADMIN.into(),
        token,
        nodes: dev_nodes,
        router: DevProcess {
            pid: router_pid,
            http_addr: http,
            config: Some(router_cfg),
        },
    };
    write_private(
        &data_dir.join(CLUSTER_FILE),
        &serde_json::to_vec_pretty(&cluster)?,
    )?;
    crate::dev::print_banner(data_dir, &cluster);

    // SIGINT or SIGTERM stop the cluster; a SIGKILL of this process leaves
    // the nodes running (their pids are in dev-cluster.json).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping");
    drop(children);
    Ok(())
}

/// The site administrator `cairn dev` makes on first start.
const ADMIN: &str = "admin";

/// How long the first start may take to accept the admin user.
const ADMIN_WAIT: Duration = Duration::from_secs(60);

/// Makes sure user `admin` exists with a live token kept in
/// `<data>/dev-token` (mode 0600, the one place a secret is kept in
/// clear), and that the router accepts it; returns the token.
async fn ensure_admin(
    data_dir: &Path,
    nodes: &[(u64, SocketAddr)],
    http: SocketAddr,
) -> Result<String> {
    use cairn_identity::token;
    let dir =
        crate::identity::Directory::new(nodes.iter().map(|(_, a)| format!("http://{a}")).collect());
    let until = Instant::now() + ADMIN_WAIT;
    // The meta group may still be electing and bootstrapping.
    let snapshot = loop {
        match dir.snapshot().await {
            Ok(s) => break s,
            Err(e) if Instant::now() < until => {
                tracing::debug!(error = %e, "identity service not ready");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    if !snapshot.users.iter().any(|u| u.username == ADMIN) {
        dir.add_user(cairn_identity::User {
            uuid: cairn_identity::new_uuid(),
            username: ADMIN.into(),
            display_name: "Administrator".into(),
            email: String::new(),
            site_admin: true,
            password_hash: None,
            created_at: 0,
        })
        .await?;
    }
    add_callers_keys(&dir, &snapshot).await;
    let path = data_dir.join("dev-token");
    let kept = fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| token::is_token(t))
        .filter(|t| {
            let key = token::decode_hex(&snapshot.token_key).unwrap_or_default();
            snapshot.tokens.iter().any(|r| {
                Some(r.id.as_str()) == token::id_of(t)
                    && r.is_live(crate::identity::now())
                    && token::matches(&key, t, &r.hash)
            })
        });
    let secret = match kept {
        Some(t) => t,
        None => {
            let (_, secret) = dir
                .create_token(
                    cairn_identity::TokenOwner::User(ADMIN.into()),
                    cairn_identity::Scope::ALL.to_vec(),
                    None,
                    "cairn dev".into(),
                )
                .await?;
            write_private(&path, secret.as_bytes())?;
            secret
        }
    };
    // The router learns of new tokens within a poll; be sure before
    // printing it.
    loop {
        match router_accepts(http, ADMIN, &secret).await {
            Ok(true) => return Ok(secret),
            _ if Instant::now() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(false) => bail!("the router does not accept the admin token"),
            Err(e) => return Err(e),
        }
    }
}

/// Gives `admin` the caller's `~/.ssh/id_*.pub` keys (those not yet
/// registered to anyone), so `git clone ssh://…` works at once.
async fn add_callers_keys(dir: &crate::identity::Directory, snapshot: &cairn_identity::Snapshot) {
    let Some(home) = std::env::var_os("HOME") else {
        return;
    };
    let Ok(entries) = fs::read_dir(Path::new(&home).join(".ssh")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("id_") && name.ends_with(".pub")) {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(parsed) = cairn_identity::sshkey::parse(text.trim()) else {
            continue;
        };
        if snapshot
            .ssh_keys
            .iter()
            .any(|k| k.fingerprint == parsed.fingerprint)
        {
            continue;
        }
        let key = cairn_identity::SshKey {
            uuid: cairn_identity::new_uuid(),
            fingerprint: parsed.fingerprint,
            owner: cairn_identity::KeyOwner::User(ADMIN.into()),
            algorithm: parsed.algorithm,
            key: parsed.blob,
            comment: parsed.comment,
            label: name.clone(),
            created_at: 0,
            last_used: None,
        };
        match dir
            .change(cairn_identity::change::Change::AddKey(key))
            .await
        {
            Ok(_) => eprintln!("added ~/.ssh/{name} to user {ADMIN}"),
            Err(e) => tracing::debug!(error = %e, key = %name, "SSH key not added"),
        }
    }
}

/// Whether `GET /2.0/user` with `user:token` answers 200.
async fn router_accepts(http: SocketAddr, user: &str, token: &str) -> Result<bool> {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(http).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    let req = format!(
        "GET /2.0/user HTTP/1.1\r\nHost: {http}\r\nAuthorization: Basic {auth}\r\n\
         Connection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await?;
    Ok(head.starts_with(b"HTTP/1.1 200"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_layout_spreads_three_replicas_per_shard() {
        assert_eq!(
            dev_layout(&[1, 2, 3], 2),
            vec![(1, vec![1, 2, 3]), (2, vec![1, 2, 3])]
        );
        assert_eq!(
            dev_layout(&[1, 2, 3, 4], 4),
            vec![
                (1, vec![1, 2, 3]),
                (2, vec![2, 3, 4]),
                (3, vec![1, 3, 4]),
                (4, vec![1, 2, 4]),
            ]
        );
        assert_eq!(dev_layout(&[1, 2], 1), vec![(1, vec![1, 2])]);
    }

    #[test]
    fn dev_node_config_parses_and_validates() {
        let peers: Vec<(u64, SocketAddr)> = (1..=4)
            .map(|i| (i, SocketAddr::from(([127, 0, 0, 1], 7400 + i as u16))))
            .collect();
        let layout = dev_layout(&[1, 2, 3, 4], 4);
        let text = node_config(
            Path::new("/tmp/n"),
            2,
            peers[1].1,
            &peers,
            &layout,
            &[1, 2, 3],
            false,
        );
        let cfg: cairn_storage_node::Config = toml::from_str(&text).expect("parses");
        cfg.validate().expect("valid");
        let shards = cfg.shards.expect("shards");
        assert_eq!(shards.meta_voters(), vec![1, 2, 3]);
        assert_eq!(shards.shards.len(), 4);

        // A node joining a running cluster: no layout, not a meta node.
        let text = node_config(
            Path::new("/tmp/n"),
            4,
            peers[3].1,
            &peers,
            &[],
            &[1, 3],
            false,
        );
        let cfg: cairn_storage_node::Config = toml::from_str(&text).expect("parses");
        cfg.validate().expect("valid");
        let shards = cfg.shards.expect("shards");
        assert!(shards.shards.is_empty());
        assert_eq!(shards.meta_voters(), vec![1, 3]);
    }
}
