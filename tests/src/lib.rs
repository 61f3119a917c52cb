//! Cluster test kit: the harness of Cairn's end-to-end suite.
//!
//! It starts a real local cluster with `cairn dev`, drives the real `git`
//! binary against it with an isolated, reproducible environment, and offers
//! the small building blocks the protocol-level tests need: a minimal HTTP/1.1
//! client, pkt-line encoding and decoding, receive-pack request bodies and a
//! deterministic generator of long histories with real deltas (fed to
//! `git fast-import`).
//!
//! Conventions:
//! * `cairn` is found next to the test executable's target dir
//!   (`…/debug/deps/test_x-hash` → `…/debug/cairn`), or at `$CAIRN_BIN`.
//! * A cluster started with [`Cluster::start`] is stopped when dropped; the
//!   per-binary [`Cluster::shared`] one is stopped by a watchdog process when
//!   the test binary exits (however it exits).
//! * Every git command runs with `HOME` in a temp dir, no system config, no
//!   terminal prompt, pinned identities and dates that advance by one minute
//!   per command, so that object ids are reproducible.
//! * `CAIRN_KEEP_DATA=1` keeps the cluster data and logs for inspection.
//! * Replicated clusters (`cairn dev --nodes N`) are inspected and faulted
//!   through each storage node's gRPC Admin service ([`Cluster::leader`],
//!   [`Cluster::wait_converged`], [`Cluster::set_faults`]); every process
//!   the harness starts besides `cairn dev` (restarted nodes, extra routers)
//!   is reaped on drop and known to the watchdog.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use anyhow::Result;
use anyhow::{anyhow, bail, ensure, Context};
use serde_json::Value;

/// Workspace used for the repositories the suite creates.
pub const WORKSPACE: &str = "e2e";

/// Default time limit of one git command.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(180);

/// How long `cairn dev` may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Generic helpers
// ---------------------------------------------------------------------------

/// Polls `cond` until it yields `Some`, an error, or `timeout` passes.
///
/// Polling starts fast (5 ms) and backs off to 200 ms, so waits end as soon
/// as the condition holds without fixed sleeps.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// The current UTC time of day (`HH:MM:SS.mmm`), to line test output up
/// with the servers' logs.
pub fn utc_time_of_day() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = now.as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A name unique within this machine run: `prefix-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of the `cairn` binary: `$CAIRN_BIN`, else `<target>/<profile>/cairn`
/// derived from the running test executable.
pub fn cairn_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAIRN_BIN") {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "CAIRN_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    // …/debug/deps/test_x-hash → …/debug/cairn
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join("cairn");
    ensure!(
        bin.is_file(),
        "the cairn binary is missing at {}: build it first with `cargo build -p cairn` (or \
         `cargo build --workspace`), or point CAIRN_BIN at it",
        bin.display()
    );
    Ok(bin)
}

fn tail_of_file(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn send_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn pid_alive(pid: u32) -> bool {
    // A killed child not yet reaped by its parent is a zombie: it holds no
    // sockets or locks any more, so it counts as dead.
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some(state) = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
        {
            if state == "Z" || state == "X" {
                return false;
            }
        }
    }
    Command::new("kill")
        .arg("-0")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 client (enough for the REST API and raw smart HTTP)
// ---------------------------------------------------------------------------

/// Standard base64 (with padding).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }
}

/// One HTTP request.
#[derive(Debug, Clone)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(String, String)>,
    pub body: Option<&'a [u8]>,
    pub timeout: Duration,
}

impl<'a> HttpRequest<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn body(mut self, body: &'a [u8]) -> Self {
        self.body = Some(body);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sends it to `base_url` (`http://host:port`) over a fresh connection
    /// (`Connection: close`).
    pub fn send(&self, base_url: &str) -> Result<HttpResponse> {
        self.send_split(base_url, usize::MAX, || {})
    }

    /// Like [`HttpRequest::send`], but sends only the first `split` bytes of
    /// the body, runs `between`, then sends the rest: for faults injected
    /// while the server is already handling the request.
    pub fn send_split(
        &self,
        base_url: &str,
        split: usize,
        between: impl FnOnce(),
    ) -> Result<HttpResponse> {
        let authority = base_url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("only http:// is supported: {base_url}"))?
            .trim_end_matches('/');
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("resolve {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("no address for {authority}"))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        // A `Host` among the headers replaces the one naming the server.
        let host = if self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            String::new()
        } else {
            format!("Host: {authority}\r\n")
        };
        let mut head = format!(
            "{} {} HTTP/1.1\r\n{host}Connection: close\r\nUser-Agent: cairn-tests\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            let _ = write!(head, "{k}: {v}\r\n");
        }
        if let Some(b) = self.body {
            let _ = write!(head, "Content-Length: {}\r\n", b.len());
        }
        head.push_str("\r\n");
        // A server may answer (and close) before reading a bad body: keep the
        // write error only to report it if no response can be read.
        let body = self.body.unwrap_or_default();
        let (first, rest) = body.split_at(split.min(body.len()));
        let mut write_result = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(first))
            .and_then(|()| stream.flush());
        // Called whatever happened, so that a caller waiting on it is not
        // left hanging.
        between();
        if write_result.is_ok() {
            write_result = stream.write_all(rest).and_then(|()| stream.flush());
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(resp) = parse_http_response(&buf, false)? {
                return Ok(resp);
            }
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if buf.is_empty() {
                        return Err(anyhow!(e)).context(format!(
                            "reading the response to {} {} (write: {:?})",
                            self.method, self.path, write_result
                        ));
                    }
                    break;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "timeout reading response to {} {}",
                self.method,
                self.path
            );
        }
        match parse_http_response(&buf, true)? {
            Some(r) => Ok(r),
            None => bail!(
                "incomplete response to {} {} ({} bytes: {:?}; write: {:?})",
                self.method,
                self.path,
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(300)]),
                write_result
            ),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a full response out of `buf`; `None` while more bytes are needed.
/// With `eof`, a body without length ends at the end of the buffer.
fn parse_http_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let rest = &buf[head_end + 4..];
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let Some(le) = find(&rest[pos..], b"\r\n") else {
                return Ok(None);
            };
            let size_str = std::str::from_utf8(&rest[pos..pos + le])?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size_str:?}"))?;
            pos += le + 2;
            if size == 0 {
                break;
            }
            if rest.len() < pos + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        body
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().context("bad content-length")?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body,
    }))
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

/// One storage node as reported in `dev-cluster.json`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: u64,
    pub grpc_addr: String,
    pub pid: Option<u32>,
}

/// Contents of `DIR/dev-cluster.json`.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub http_url: String,
    /// `ssh://git@host:port` (empty if the router serves no SSH).
    pub ssh_url: String,
    pub username: String,
    pub token: String,
    pub nodes: Vec<NodeInfo>,
    pub router_pid: Option<u32>,
}

impl ClusterInfo {
    fn parse(v: &Value) -> Result<Self> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("dev-cluster.json lacks string {k:?}: {v}"))
        };
        let pid = |v: Option<&Value>| {
            v.and_then(Value::as_u64)
                .and_then(|p| u32::try_from(p).ok())
        };
        let nodes = v
            .get("nodes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|n| NodeInfo {
                        id: n.get("id").and_then(Value::as_u64).unwrap_or(0),
                        grpc_addr: n
                            .get("grpc_addr")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        pid: pid(n.get("pid")),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            http_url: s("http_url")?.trim_end_matches('/').to_owned(),
            ssh_url: v
                .get("ssh_url")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            username: s("username")?,
            token: s("token")?,
            nodes,
            router_pid: pid(v.get("router").and_then(|r| r.get("pid"))),
        })
    }
}

/// A running `cairn dev` process and its data dir.
pub struct Cluster {
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    info: ClusterInfo,
    starts: u32,
    /// Storage-node processes `cairn dev` runs (1: in-process).
    node_count: u64,
    /// Nodes started again by the test after a kill; stopped on drop.
    restarted: Vec<Child>,
    /// Whether `cairn dev` runs with `--fault-injection`.
    fault_injection: bool,
    /// Routers started by [`Cluster::start_router`]; stopped on drop.
    routers: Vec<Child>,
    shards: Option<u64>,
    env: Vec<(String, String)>,
}

/// How [`Cluster::start_with`] starts `cairn dev`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Storage-node processes (`--nodes`); with 1, shards have one voter.
    pub nodes: u64,
    /// Start with `--fault-injection`, so that the nodes accept
    /// `Admin.SetFaults` (see [`Cluster::set_faults`]).
    pub fault_injection: bool,
    /// `--shards`; `None` takes `cairn dev`'s default. The replica helpers
    /// below (`leader`, `replica_status`, …) assume one shard.
    pub shards: Option<u64>,
    /// Extra environment for the cluster's processes.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            fault_injection: false,
            shards: Some(1),
            env: Vec::new(),
        }
    }
}

impl Cluster {
    /// Starts a fresh cluster in a new temp dir and waits until it is ready.
    pub fn start() -> Result<Self> {
        // The suite runs against what `cairn dev` starts by default: three
        // replicated storage-node processes. CAIRN_E2E_NODES=1 runs it
        // against one node (one-voter groups) instead.
        let nodes = std::env::var("CAIRN_E2E_NODES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        // `cairn dev`'s default shard count: workspaces spread over shards.
        Self::start_with(ClusterOptions {
            nodes,
            shards: None,
            ..ClusterOptions::default()
        })
    }

    /// Like [`Cluster::start`] with `cairn dev --nodes N`: N storage-node
    /// processes holding one Raft-replicated shard, and a router process.
    pub fn start_with_nodes(node_count: u64) -> Result<Self> {
        Self::start_with(ClusterOptions {
            nodes: node_count,
            ..ClusterOptions::default()
        })
    }

    /// Starts a fresh cluster as `opts` says and waits until it is ready.
    pub fn start_with(opts: ClusterOptions) -> Result<Self> {
        let node_count = opts.nodes;
        let root = tempfile::Builder::new().prefix("cairn-e2e-").tempdir()?;
        let root_path = root.path().to_path_buf();
        let data_dir = root_path.join("data");
        fs::create_dir_all(&data_dir)?;
        let mut c = Self {
            root: Some(root),
            log_path: root_path.join("cairn.log"),
            root_path,
            data_dir,
            child: None,
            watchdog: None,
            info: ClusterInfo {
                http_url: String::new(),
                ssh_url: String::new(),
                username: String::new(),
                token: String::new(),
                nodes: Vec::new(),
                router_pid: None,
            },
            starts: 0,
            node_count,
            restarted: Vec::new(),
            fault_injection: opts.fault_injection,
            shards: opts.shards,
            env: opts.env.clone(),
            routers: Vec::new(),
        };
        if std::env::var_os("CAIRN_KEEP_DATA").is_some() {
            if let Some(r) = c.root.take() {
                let p = r.keep();
                // Written past the test harness's output capture on purpose.
                let _ = writeln!(std::io::stderr(), "cluster data kept in {}", p.display());
            }
        }
        c.spawn()?;
        Ok(c)
    }

    /// The cluster shared by all tests of one test binary (started on first
    /// use; stopped, and its data removed, when the binary exits).
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();
        let r = SHARED.get_or_init(|| {
            Cluster::start()
                .map(|mut c| {
                    // Never dropped: the watchdog cleans up at process exit.
                    if let Some(root) = c.root.take() {
                        let _ = root.keep();
                        c.arm_watchdog(true);
                    }
                    c
                })
                .map_err(|e| format!("{e:#}"))
        });
        match r {
            Ok(c) => c,
            Err(e) => panic!("cannot start the shared cairn dev cluster: {e}"),
        }
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn http_url(&self) -> &str {
        &self.info.http_url
    }

    /// The tail of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        tail_of_file(&self.log_path, 8000)
    }

    fn json_path(&self) -> PathBuf {
        self.data_dir.join("dev-cluster.json")
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = cairn_bin()?;
        // A file left by a previous run must not be taken for readiness.
        let _ = fs::remove_file(self.json_path());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        self.starts += 1;
        let mut cmd = Command::new(&bin);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--http")
            .arg("127.0.0.1:0")
            .arg("--nodes")
            .arg(self.node_count.to_string())
            .args(self.fault_injection.then_some("--fault-injection"))
            .args(
                self.shards
                    .map(|n| vec!["--shards".to_owned(), n.to_string()])
                    .unwrap_or_default(),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} dev", bin.display()))?;
        self.child = Some(child);
        self.arm_watchdog(false);
        let json_path = self.json_path();
        let res = wait_until("cairn dev to become ready", START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "cairn dev exited early with {status}; log:\n{}",
                        tail_of_file(&self.log_path, 8000)
                    );
                }
            }
            let Ok(text) = fs::read_to_string(&json_path) else {
                return Ok(None);
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                return Ok(None);
            };
            let info = ClusterInfo::parse(&v)?;
            match HttpRequest::new("GET", "/healthz")
                .timeout(Duration::from_secs(5))
                .send(&info.http_url)
            {
                Ok(r) if r.status == 200 => Ok(Some(info)),
                _ => Ok(None),
            }
        });
        match res {
            Ok(info) => {
                self.info = info;
                // The watchdog must also know the node pids: re-arm it.
                self.arm_watchdog(self.root.is_none());
                Ok(())
            }
            Err(e) => {
                self.stop_processes();
                Err(e.context(format!("server log:\n{}", self.log_tail())))
            }
        }
    }

    /// Starts a helper process that stops the cluster when this process
    /// exits: it waits for EOF on a pipe that only this process holds.
    fn arm_watchdog(&mut self, remove_root: bool) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            // Kill it before closing its pipe: EOF would make it stop the
            // cluster.
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let mut pids = vec![child.id()];
        pids.extend(self.info.nodes.iter().filter_map(|n| n.pid));
        pids.extend(self.info.router_pid);
        // Restarted nodes and extra routers are children of this process,
        // not of `cairn dev`: only the watchdog stops them if it dies.
        pids.extend(self.restarted.iter().map(Child::id));
        pids.extend(self.routers.iter().map(Child::id));
        pids.sort_unstable();
        pids.dedup();
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let script = r#"
cat >/dev/null 2>&1
pids="$1"
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 50 ] && kill -0 $pids 2>/dev/null; do sleep 0.1; i=$((i+1)); done
kill -KILL $pids 2>/dev/null
if [ -n "$2" ]; then rm -rf "$2"; fi
"#;
        let keep = std::env::var_os("CAIRN_KEEP_DATA").is_some();
        let root_arg = if remove_root && !keep {
            self.root_path.display().to_string()
        } else {
            String::new()
        };
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("cairn-e2e-watchdog")
            .arg(pids.join(" "))
            .arg(root_arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut w) = spawned {
            if let Some(stdin) = w.stdin.take() {
                self.watchdog = Some((w, stdin));
            }
        }
    }

    fn stop_processes(&mut self) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
        let mut extra: Vec<u32> = self.info.nodes.iter().filter_map(|n| n.pid).collect();
        extra.extend(self.info.router_pid);
        if let Some(mut child) = self.child.take() {
            extra.retain(|p| *p != child.id());
            send_signal(child.id(), "TERM");
            let exited = wait_until("cairn dev to exit", Duration::from_secs(10), || {
                Ok(child.try_wait()?.map(|_| ()))
            });
            if exited.is_err() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for pid in extra {
            if pid_alive(pid) {
                send_signal(pid, "TERM");
                if wait_until("node exit", Duration::from_secs(5), || {
                    Ok((!pid_alive(pid)).then_some(()))
                })
                .is_err()
                {
                    send_signal(pid, "KILL");
                }
            }
        }
    }

    /// Stops the processes (SIGTERM, then SIGKILL after 10 s), keeping data.
    pub fn stop(&mut self) {
        self.stop_processes();
    }

    /// Starts `cairn dev` again on the same data dir.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_processes();
        self.spawn()
    }

    /// Stops `cairn dev` and starts it again on the same data dir with
    /// `--nodes nodes`: the nodes beyond the old count join the cluster.
    pub fn restart_with_nodes(&mut self, nodes: u64) -> Result<()> {
        self.stop_processes();
        self.node_count = nodes;
        self.spawn()
    }

    /// Whether the `cairn dev` process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    // -- URLs and HTTP ------------------------------------------------------

    /// `http://user:token@host:port/{full_name}.git`
    pub fn repo_url(&self, full_name: &str) -> String {
        self.repo_url_at(&self.info.http_url, full_name)
    }

    /// Like [`Cluster::repo_url`] through another router at `http_url`
    /// (e.g. [`ExtraRouter::http_url`]).
    pub fn repo_url_at(&self, http_url: &str, full_name: &str) -> String {
        let rest = http_url.strip_prefix("http://").unwrap_or(http_url);
        format!(
            "http://{}:{}@{rest}/{full_name}.git",
            percent_encode(&self.info.username),
            percent_encode(&self.info.token)
        )
    }

    /// The same URL without credentials.
    pub fn repo_url_anonymous(&self, full_name: &str) -> String {
        format!("{}/{full_name}.git", self.info.http_url)
    }

    /// `Authorization` header value for HTTP Basic with the cluster token.
    pub fn basic_auth(&self) -> String {
        format!(
            "Basic {}",
            base64(format!("{}:{}", self.info.username, self.info.token).as_bytes())
        )
    }

    /// The id of repository `full_name` (`ws/slug`), from the uuid its REST
    /// object carries.
    pub fn repo_id(&self, full_name: &str) -> Result<u64> {
        let r = self
            .request("GET", &format!("/2.0/repositories/{full_name}"))
            .send(self.http_url())?;
        ensure!(
            r.status == 200,
            "GET {full_name}: {} {}",
            r.status,
            r.text()
        );
        let uuid = r.json()?["uuid"]
            .as_str()
            .context("uuid")?
            .trim_matches(|c| c == '{' || c == '}')
            .to_owned();
        let parts: Vec<&str> = uuid.split('-').collect();
        ensure!(parts.len() == 5, "uuid {uuid}");
        let hi = u64::from_str_radix(parts[0], 16)?;
        let lo = u64::from_str_radix(parts[4], 16)?;
        Ok((hi << 32) | (lo & 0xffff_ffff))
    }

    /// Every pack file of repository `full_name` on every node's disk —
    /// committed (`packs/<id>/`) or staged for a commit
    /// (`staging/transfer/<shard>/<id>/`) — as paths relative to the
    /// cluster's data folder. A refused push must leave this as it found
    /// it.
    pub fn pack_files(&self, full_name: &str) -> Result<BTreeSet<PathBuf>> {
        let id = self.repo_id(full_name)?.to_string();
        let mut out = BTreeSet::new();
        for node in self.node_ids() {
            let node = self.data_dir.join(format!("node-{node}"));
            let mut dirs = vec![node.join("packs").join(&id)];
            if let Ok(shards) = fs::read_dir(node.join("staging").join("transfer")) {
                for shard in shards {
                    dirs.push(shard?.path().join(&id));
                }
            }
            for dir in dirs {
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry?.path();
                    out.insert(path.strip_prefix(&self.data_dir)?.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Waits (briefly: replicas apply a moment after the leader answers)
    /// until the nodes hold exactly the pack files `before` of `full_name`.
    pub fn assert_pack_files(
        &self,
        full_name: &str,
        before: &BTreeSet<PathBuf>,
        what: &str,
    ) -> Result<()> {
        let mut now = BTreeSet::new();
        let settled = wait_until("the pack files as before", Duration::from_secs(10), || {
            now = self.pack_files(full_name)?;
            Ok((&now == before).then_some(()))
        });
        settled.with_context(|| {
            let added: Vec<_> = now.difference(before).collect();
            let gone: Vec<_> = before.difference(&now).collect();
            format!("{what}: pack files left behind {added:?}, gone {gone:?}")
        })
    }

    /// An authenticated request to the router.
    pub fn request<'a>(&self, method: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest::new(method, path).header("Authorization", &self.basic_auth())
    }

    /// Creates `ws/slug` over the REST API, asserting 201; returns the JSON.
    pub fn create_repo(&self, full_name: &str) -> Result<Value> {
        let path = format!("/2.0/repositories/{full_name}");
        let r = self
            .request("POST", &path)
            .header("Content-Type", "application/json")
            .body(br#"{"scm":"git","is_private":true}"#)
            .send(self.http_url())?;
        ensure!(
            r.status == 201,
            "POST {path}: expected 201, got {} {}",
            r.status,
            r.text()
        );
        r.json()
    }

    /// Creates a repository with a unique slug; returns `ws/slug`.
    pub fn new_repo(&self, prefix: &str) -> Result<String> {
        let full = format!("{WORKSPACE}/{}", unique_name(prefix));
        self.create_repo(&full)?;
        Ok(full)
    }

    /// Runs `cairn admin --data-dir DIR <args>`; returns the raw output.
    pub fn admin(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = Command::new(cairn_bin()?)
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run cairn admin")?;
        Ok(out)
    }
}

impl Cluster {
    /// Runs `cairn ARGS --data-dir DATA` (any subcommand that takes the
    /// dev data folder: `cluster`, `node`, `shard`, `admin`).
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(cairn_bin()?)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .output()
            .context("run cairn")
    }

    /// Runs `cairn ARGS --node <node's URL>`: that node runs the command
    /// (a move runs there).
    pub fn cli_at(&self, node: u64, args: &[&str]) -> Result<std::process::Output> {
        let url = format!("http://{}", self.node_grpc_addr(node)?);
        Command::new(cairn_bin()?)
            .args(args)
            .arg("--node")
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .context("run cairn")
    }

    /// Starts storage node `id` as a new, empty process joining the
    /// cluster (its config lists the existing nodes as peers and the first
    /// three as meta nodes) and registers it with `cairn node add`.
    pub fn add_node(&mut self, id: u64) -> Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut peers = String::new();
        let mut ids: Vec<u64> = self.info.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        for n in &self.info.nodes {
            peers.push_str(&format!("{} = \"{}\"\n", n.id, n.grpc_addr));
        }
        peers.push_str(&format!("{id} = \"{addr}\"\n"));
        let meta: Vec<String> = ids.iter().take(3).map(u64::to_string).collect();
        let config = format!(
            "data-dir = \"{data}\"\ngrpc-addr = \"{addr}\"\n{faults}\n[shards]\nnode-id = {id}\nreplication-factor = 3\nmeta = [{meta}]\n\n[shards.peers]\n{peers}",
            data = self.data_dir.join(format!("node-{id}")).display(),
            faults = if self.fault_injection {
                "fault-injection = true"
            } else {
                ""
            },
            meta = meta.join(", "),
        );
        fs::write(self.data_dir.join(format!("node-{id}.toml")), config)?;
        self.info.nodes.push(NodeInfo {
            id,
            grpc_addr: addr.clone(),
            pid: None,
        });
        self.restart_node(id)?;
        wait_until(
            &format!("node {id} to listen on {addr}"),
            Duration::from_secs(30),
            || Ok(std::net::TcpStream::connect(addr.as_str()).ok().map(|_| ())),
        )?;
        let out = self.cli(&["node", "add", &id.to_string(), "--addr", &addr])?;
        if !out.status.success() {
            bail!(
                "cairn node add {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// SIGKILLs storage node `id` (multi-process clusters).
    pub fn kill_node(&mut self, id: u64) -> Result<()> {
        if let Some(pos) = self
            .restarted
            .iter()
            .position(|c| self.node_pid(id) == Some(c.id()))
        {
            let mut c = self.restarted.remove(pos);
            let killed = c.kill();
            c.wait()?;
            killed?;
            return Ok(());
        }
        let pid = self
            .node_pid(id)
            .ok_or_else(|| anyhow!("no pid for node {id}"))?;
        send_signal(pid, "KILL");
        wait_until(
            &format!("node {id} to die"),
            Duration::from_secs(10),
            || Ok((!pid_alive(pid)).then_some(())),
        )
    }

    fn node_pid(&self, id: u64) -> Option<u32> {
        self.info
            .nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.pid)
    }

    /// Starts storage node `id` again from the config `cairn dev` wrote.
    pub fn restart_node(&mut self, id: u64) -> Result<()> {
        let config = self.data_dir.join(format!("node-{id}.toml"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("logs").join(format!("node-{id}.log")))?;
        let child = Command::new(cairn_bin()?)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restart node")?;
        let pid = child.id();
        if let Some(n) = self.info.nodes.iter_mut().find(|n| n.id == id) {
            n.pid = Some(pid);
        }
        self.restarted.push(child);
        self.arm_watchdog(self.root.is_none());
        Ok(())
    }

    /// Ids of the storage nodes, ascending.
    pub fn node_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.info.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids
    }

    /// gRPC address (`host:port`) of storage node `id`.
    pub fn node_grpc_addr(&self, id: u64) -> Result<&str> {
        self.info
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.grpc_addr.as_str())
            .ok_or_else(|| anyhow!("no storage node {id} in dev-cluster.json"))
    }

    /// Path of storage node `id`'s log (appended to across restarts).
    pub fn node_log_path(&self, id: u64) -> PathBuf {
        self.data_dir.join("logs").join(format!("node-{id}.log"))
    }

    /// The last `max` bytes of storage node `id`'s log.
    pub fn node_log_tail(&self, id: u64, max: usize) -> String {
        tail_of_file(&self.node_log_path(id), max)
    }

    /// Starts another `cairn router` process that talks to the storage
    /// nodes `nodes` only (pinned: it asks no directory; it still follows
    /// leader hints those nodes give). Stopped by [`Cluster::stop_router`] or on drop.
    pub fn start_router(&mut self, nodes: &[u64]) -> Result<ExtraRouter> {
        ensure!(
            !nodes.is_empty(),
            "a router needs at least one storage node"
        );
        let urls = nodes
            .iter()
            .map(|&id| Ok(format!("\"http://{}\"", self.node_grpc_addr(id)?)))
            .collect::<Result<Vec<_>>>()?;
        // Bound and released at once: a small race with other programs
        // taking the port, acceptable in tests, and the error would show.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let n = self.routers.len() + 1;
        let config = self.root_path.join(format!("router-extra-{n}.toml"));
        fs::write(
            &config,
            format!(
                "http-addr = \"127.0.0.1:{port}\"\n\
                 storage-node = {first}\n\
                 storage-nodes = [{all}]\n\
                 token = \"{token}\"\n\
                 pinned = true\n",
                first = urls[0],
                all = urls.join(", "),
                token = self.info.token,
            ),
        )?;
        let log_path = self
            .data_dir
            .join("logs")
            .join(format!("router-extra-{n}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(cairn_bin()?);
        cmd.arg("router")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().context("start router")?;
        let router = ExtraRouter {
            pid: child.id(),
            http_url: format!("http://127.0.0.1:{port}"),
            nodes: nodes.to_vec(),
            log_path: log_path.clone(),
        };
        self.routers.push(child);
        self.arm_watchdog(self.root.is_none());
        let ready = wait_until("the extra router to serve", START_TIMEOUT, || {
            if let Some(c) = self.routers.iter_mut().find(|c| c.id() == router.pid) {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "router exited early with {status}; log:\n{}",
                        tail_of_file(&log_path, 8000)
                    );
                }
            }
            match HttpRequest::new("GET", "/healthz")
                .timeout(Duration::from_secs(5))
                .send(&router.http_url)
            {
                Ok(r) if r.status == 200 => Ok(Some(())),
                _ => Ok(None),
            }
        });
        if let Err(e) = ready {
            let _ = self.stop_router(&router);
            return Err(e);
        }
        Ok(router)
    }

    /// Stops (SIGKILL) and reaps a router started by
    /// [`Cluster::start_router`].
    pub fn stop_router(&mut self, router: &ExtraRouter) -> Result<()> {
        let pos = self
            .routers
            .iter()
            .position(|c| c.id() == router.pid)
            .ok_or_else(|| anyhow!("router {} is not running", router.pid))?;
        let mut c = self.routers.remove(pos);
        let killed = c.kill();
        c.wait()?;
        self.arm_watchdog(self.root.is_none());
        killed.context("kill router")
    }
}

// ---------------------------------------------------------------------------
// Shard administration (gRPC `cairn.admin.v1.Admin` on each storage node)
// ---------------------------------------------------------------------------

pub use cairn_proto::admin::ShardReplicaStatus;

/// The shard every repository of a `cairn dev --nodes N` cluster lives on.
pub const DEV_SHARD: u64 = 1;

/// Connect timeout of an admin call: a killed node refuses at once, a
/// partitioned one does not (SetFaults only cuts raft traffic, though).
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Time limit of one admin call.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The runtime the blocking admin helpers run their calls on; shared so
/// that test threads can call them concurrently.
fn admin_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cairn-tests-admin")
            .enable_all()
            .build()
            .expect("building the tokio runtime for admin calls")
    })
}

/// The gRPC code of an error returned by an admin helper, if the node
/// answered with one.
pub fn grpc_code(e: &anyhow::Error) -> Option<tonic::Code> {
    e.chain()
        .find_map(|c| c.downcast_ref::<tonic::Status>())
        .map(tonic::Status::code)
}

/// A one-line summary of replica states, for messages and progress output.
pub fn describe_replicas(replicas: &[ShardReplicaStatus]) -> String {
    replicas
        .iter()
        .map(|r| {
            format!(
                "node {}: leader {} term {} applied {} last_log {} repos {} sum {} packs {}",
                r.node_id,
                r.leader_id,
                r.term,
                r.applied_index,
                r.last_log_index,
                r.repositories,
                r.state_checksum.get(..12).unwrap_or(&r.state_checksum),
                r.pack_checksum.get(..12).unwrap_or(&r.pack_checksum)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl Cluster {
    /// Runs `call` against storage node `node`'s Admin service over a fresh
    /// connection (so a restarted node is reached at once) and blocks for
    /// the answer. A gRPC error stays reachable through [`grpc_code`].
    pub fn admin_rpc<T, F, Fut>(&self, node: u64, call: F) -> Result<T>
    where
        F: FnOnce(cairn_proto::admin::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let url = format!("http://{}", self.node_grpc_addr(node)?);
        admin_runtime().block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect_timeout(ADMIN_CONNECT_TIMEOUT)
                .timeout(ADMIN_CALL_TIMEOUT)
                .connect()
                .await
                .with_context(|| format!("connect to node {node} at {url}"))?;
            let client = cairn_proto::admin::admin_client::AdminClient::new(channel);
            let resp = tokio::time::timeout(ADMIN_CALL_TIMEOUT, call(client))
                .await
                .with_context(|| format!("admin call to node {node} timed out"))?
                .map_err(|s| anyhow::Error::new(s).context(format!("admin call to node {node}")))?;
            Ok(resp.into_inner())
        })
    }

    /// `ShardStatus` of every replica node `node` hosts.
    pub fn shard_status(&self, node: u64) -> Result<Vec<ShardReplicaStatus>> {
        let resp = self.admin_rpc(node, |mut c| async move {
            c.shard_status(cairn_proto::admin::ShardStatusRequest::default())
                .await
        })?;
        Ok(resp.replicas)
    }

    /// The groups node `node` holds a replica of, the meta group (0)
    /// included.
    pub fn groups_on_node(&self, node: u64) -> Result<BTreeSet<u64>> {
        let resp = self.admin_rpc(node, |mut c| async move {
            c.shard_status(cairn_proto::admin::ShardStatusRequest {
                include_meta: true,
                ..Default::default()
            })
            .await
        })?;
        Ok(resp.replicas.iter().map(|r| r.shard_id).collect())
    }

    /// Node `node`'s replica of the dev shard.
    pub fn replica_status(&self, node: u64) -> Result<ShardReplicaStatus> {
        self.shard_status(node)?
            .into_iter()
            .find(|r| r.shard_id == DEV_SHARD)
            .ok_or_else(|| anyhow!("node {node} reports no replica of shard {DEV_SHARD}"))
    }

    /// Every node's replica of the dev shard, or why it could not be read
    /// (e.g. the node is down), in node id order.
    pub fn shard_status_all(&self) -> Vec<(u64, Result<ShardReplicaStatus>)> {
        self.node_ids()
            .into_iter()
            .map(|id| (id, self.replica_status(id)))
            .collect()
    }

    /// The established leader of the dev shard: a node that reports itself
    /// leader, at the highest term any such node reports, and that a
    /// majority of the voters (itself included) name as leader at that
    /// term. `None` during an election, or when an isolated node merely
    /// still believes it leads.
    pub fn leader(&self) -> Option<u64> {
        let replicas: Vec<ShardReplicaStatus> = self
            .shard_status_all()
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .collect();
        let claimant = replicas
            .iter()
            .filter(|r| r.leader_id == r.node_id)
            .max_by_key(|r| r.term)?;
        let supporters = replicas
            .iter()
            .filter(|r| r.leader_id == claimant.node_id && r.term == claimant.term)
            .count();
        let voters = claimant.voters.len().max(1);
        (supporters > voters / 2).then_some(claimant.node_id)
    }

    /// Waits for [`Cluster::leader`] to name one.
    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        wait_until("an established shard leader", timeout, || Ok(self.leader()))
            .with_context(|| format!("replicas: {}", self.describe_all()))
    }

    /// Waits until node `node` (just restarted) serves its replica again,
    /// knows a leader, and has applied at least what the leader had applied
    /// when the wait began.
    pub fn wait_rejoined(&self, node: u64, timeout: Duration) -> Result<ShardReplicaStatus> {
        let target = self
            .leader()
            .filter(|&l| l != node)
            .and_then(|l| self.replica_status(l).ok())
            .map_or(0, |s| s.applied_index);
        wait_until(&format!("node {node} to rejoin"), timeout, || {
            Ok(self
                .replica_status(node)
                .ok()
                .filter(|s| s.leader_id != 0 && s.applied_index >= target))
        })
        .with_context(|| {
            format!(
                "target applied index {target}; replicas: {}",
                self.describe_all()
            )
        })
    }

    /// Waits until every replica of the dev shard answers, all have applied
    /// the same index and hold nothing in their logs past it; then requires
    /// them to report the same state checksum (a replica that applied the
    /// same entries must hold the same rows). Returns the replicas.
    ///
    /// Only meaningful once no write is in flight. Fails at once when the
    /// checksums differ at an equal applied index: that is divergence, not
    /// lag.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Vec<ShardReplicaStatus>> {
        let mut last = String::new();
        let res = wait_until("the replicas to converge", timeout, || {
            let mut replicas = Vec::new();
            for (id, r) in self.shard_status_all() {
                match r {
                    Ok(r) => replicas.push(r),
                    Err(e) => {
                        last = format!("node {id}: {e:#}");
                        return Ok(None);
                    }
                }
            }
            last = describe_replicas(&replicas);
            let applied = replicas[0].applied_index;
            let settled = replicas
                .iter()
                .all(|r| r.applied_index == applied && r.last_log_index == applied);
            if !replicas.iter().all(|r| r.applied_index == applied) {
                return Ok(None);
            }
            let sum = &replicas[0].state_checksum;
            ensure!(
                replicas.iter().all(|r| &r.state_checksum == sum),
                "replicas diverged: same applied index {applied}, different state \
                 checksums: {last}"
            );
            // Applied entries placed their packs first: the files the rows
            // name are on every replica, whole.
            let packs = &replicas[0].pack_checksum;
            if settled {
                ensure!(
                    replicas.iter().all(|r| &r.pack_checksum == packs),
                    "replicas diverged: same applied index {applied}, different pack \
                     files: {last}"
                );
            }
            Ok(settled.then_some(replicas))
        });
        res.with_context(|| format!("last seen: {last}"))
    }

    /// `TransferLeader` of the dev shard to `to`, asked of the current
    /// leader `leader`.
    pub fn transfer_leader(&self, leader: u64, to: u64) -> Result<()> {
        self.admin_rpc(leader, |mut c| async move {
            c.transfer_leader(cairn_proto::admin::TransferLeaderRequest {
                shard_id: DEV_SHARD,
                to_node_id: to,
            })
            .await
        })?;
        Ok(())
    }

    /// `SetFaults` on `node`: drop its outgoing raft traffic to `blocked`
    /// (replacing any earlier set; empty heals). Needs a cluster started
    /// with [`ClusterOptions::fault_injection`].
    pub fn set_faults(&self, node: u64, blocked: &[u64]) -> Result<()> {
        let blocked_peers = blocked.to_vec();
        self.admin_rpc(node, |mut c| async move {
            c.set_faults(cairn_proto::admin::SetFaultsRequest { blocked_peers })
                .await
        })?;
        Ok(())
    }

    /// Cuts `group` off from the other nodes, both ways.
    pub fn partition(&self, group: &[u64]) -> Result<()> {
        let all = self.node_ids();
        let (inside, outside): (Vec<u64>, Vec<u64>) = all.iter().partition(|n| group.contains(n));
        for &n in &inside {
            self.set_faults(n, &outside)?;
        }
        for &n in &outside {
            self.set_faults(n, &inside)?;
        }
        Ok(())
    }

    /// Clears the faults of every node.
    pub fn heal(&self) -> Result<()> {
        for n in self.node_ids() {
            self.set_faults(n, &[])?;
        }
        Ok(())
    }

    /// The replicas as far as they answer, for messages.
    pub fn describe_all(&self) -> String {
        self.shard_status_all()
            .into_iter()
            .map(|(id, r)| match r {
                Ok(r) => describe_replicas(&[r]),
                Err(e) => format!("node {id}: {e:#}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

// ---------------------------------------------------------------------------
// Push outcomes
// ---------------------------------------------------------------------------

/// What a push's client can know about its fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// git exited 0: the server acknowledged every ref.
    Accepted,
    /// The server (or git, before sending) definitely refused; the text is
    /// the reason. Nothing of the push may be visible afterwards.
    Rejected(String),
    /// Anything else: transport errors, HTTP 5xx, "outcome unknown",
    /// timeouts. The push may or may not have applied.
    Unknown(String),
}

impl PushOutcome {
    /// Classifies a single-ref `git push` from its exit code and output.
    /// Errs towards `Unknown`: only a report that names the ref as refused
    /// for a reason other than an unknown outcome counts as a rejection.
    pub fn of(o: &GitOutput) -> Self {
        if o.success() {
            return PushOutcome::Accepted;
        }
        let text = format!("{}\n{}", o.stdout, o.stderr);
        for line in text.lines() {
            let reason = |marker: &str| {
                let rest = &line[line.find(marker)? + marker.len()..];
                let start = rest.find('(')?;
                let end = rest.rfind(')')?;
                (start < end).then(|| rest[start + 1..end].to_owned())
            };
            if let Some(r) = reason("[remote rejected]") {
                return if r.to_lowercase().contains("unknown") {
                    PushOutcome::Unknown(r)
                } else {
                    PushOutcome::Rejected(r)
                };
            }
            if let Some(r) = reason("[rejected]") {
                return PushOutcome::Rejected(r);
            }
        }
        let summary = o
            .stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .to_owned();
        PushOutcome::Unknown(format!("exit {:?}: {summary}", o.code))
    }

    /// Runs `cmd` (a `git push` of one ref) and classifies it; a harness
    /// timeout counts as unknown.
    pub fn run(cmd: GitCmd) -> Result<(Self, Option<GitOutput>)> {
        match cmd.output() {
            Ok(o) => Ok((Self::of(&o), Some(o))),
            Err(e) if format!("{e:#}").contains("timed out") => {
                Ok((PushOutcome::Unknown(format!("{e:#}")), None))
            }
            Err(e) => Err(e),
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, PushOutcome::Accepted)
    }
}

/// `-c` options making git give up on a stalled HTTP transfer instead of
/// waiting for the harness timeout: under 1 byte/s for 20 s.
pub const GIT_HTTP_STALL_LIMITS: [&str; 4] =
    ["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=20"];

/// One push attempt of a [`BranchPusher`].
#[derive(Debug, Clone)]
pub struct PushAttempt {
    /// The commit pushed (new for every attempt).
    pub commit: String,
    pub outcome: PushOutcome,
    /// Wall time of the `git push`.
    pub took: Duration,
    /// When it ended, from the pusher's creation.
    pub ended_at: Duration,
    /// For an unknown outcome: whether a later read of the branch showed
    /// the push had applied.
    pub seen_applied: bool,
}

/// What [`BranchPusher::verify`] found.
#[derive(Debug, Clone, Default)]
pub struct PushTally {
    pub accepted: usize,
    pub rejected: usize,
    pub unknown: usize,
    /// Unknown-outcome pushes found applied: by a read of the branch right
    /// after them, or in the final history.
    pub unknown_applied: usize,
}

impl PushTally {
    pub fn add(&mut self, o: &PushTally) {
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.unknown += o.unknown;
        self.unknown_applied += o.unknown_applied;
    }
}

impl std::fmt::Display for PushTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted {}, rejected {}, unknown {} (found applied: {})",
            self.accepted, self.rejected, self.unknown, self.unknown_applied
        )
    }
}

/// A git client that force-pushes a series of commits to one branch that
/// only it writes, each new commit a child of the last one known to be on
/// the server. A push that is not accepted is followed, as the server
/// advises, by a read of the branch: if it shows one of the pushes of
/// unknown outcome, that one applied and becomes the base.
///
/// So, whatever failures happen: the acknowledged and seen-applied commits
/// form a chain the final branch must contain, a refused commit is an
/// ancestor of nothing later and must be absent, every read of the branch
/// shows the last known commit or an unknown-outcome push made after it,
/// and so does the final tip.
pub struct BranchPusher {
    pub work: Repo,
    pub url: String,
    pub branch: String,
    /// Limit of one `git push` (a timeout counts as unknown).
    pub push_timeout: Duration,
    /// Every `n`-th attempt (0: never) also adds a file of `bytes`
    /// incompressible bytes, so that some pushes carry packs large enough
    /// for faults to land while they are transferred: `(n, bytes)`.
    pub large_every: (usize, usize),
    /// Read the branch after a push that was not accepted (default): off
    /// where reads are known to hang, to save the time.
    pub read_after_failure: bool,
    root: String,
    file: String,
    /// The last commit known to be the branch's value on the server.
    last_known: Option<String>,
    attempts: Vec<PushAttempt>,
    /// Reads of the branch that contradict the attempts' outcomes.
    anomalies: Vec<String>,
    started: Instant,
}

impl BranchPusher {
    /// A fresh work repository (in `git`'s home) pushing to `branch` at
    /// `url`.
    pub fn new(git: &Git, url: &str, branch: &str) -> Result<Self> {
        let work = git.init(git.scratch(&format!("pusher-{branch}")))?;
        let file = format!("{branch}.txt");
        let root = work.commit_file(&file, &format!("root of {branch}\n"), "root")?;
        Ok(Self {
            work,
            url: url.to_owned(),
            branch: branch.to_owned(),
            push_timeout: Duration::from_secs(60),
            large_every: (0, 0),
            read_after_failure: true,
            root,
            file,
            last_known: None,
            attempts: Vec::new(),
            anomalies: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Commits on top of the last known commit and pushes it; after a
    /// failure, reads the branch to settle earlier unknown outcomes.
    pub fn push_next(&mut self) -> Result<&PushAttempt> {
        let base = self.last_known.as_deref().unwrap_or(&self.root).to_owned();
        let n = self.attempts.len();
        self.work.run(["reset", "-q", "--hard", &base])?;
        let mut content = fs::read_to_string(self.work.path.join(&self.file))?;
        let _ = writeln!(content, "{} attempt {n}", self.branch);
        let (every, bytes) = self.large_every;
        if every > 0 && n % every == every - 1 {
            let mut rng = Rng::new(
                self.branch
                    .bytes()
                    .fold(n as u64, |h, b| h.wrapping_mul(31) ^ u64::from(b)),
            );
            let data: Vec<u8> = (0..bytes.div_ceil(8))
                .flat_map(|_| rng.next_u64().to_le_bytes())
                .collect();
            self.work.write_file(&format!("large-{n}.bin"), data)?;
        }
        let commit = self.work.commit_file(
            &self.file,
            &content,
            &format!("{} attempt {n}", self.branch),
        )?;
        let t = Instant::now();
        let (outcome, _) = PushOutcome::run(
            self.work
                .cmd()
                .args(GIT_HTTP_STALL_LIMITS)
                .args(["push", "-q", &self.url])
                .arg(format!("+HEAD:refs/heads/{}", self.branch))
                .timeout(self.push_timeout),
        )?;
        let accepted = outcome.is_accepted();
        if accepted {
            self.last_known = Some(commit.clone());
        }
        self.attempts.push(PushAttempt {
            commit,
            outcome,
            took: t.elapsed(),
            ended_at: self.started.elapsed(),
            seen_applied: false,
        });
        if !accepted && self.read_after_failure {
            self.settle()?;
        }
        Ok(self.attempts.last().expect("just pushed"))
    }

    /// Reads the branch (a failed read changes nothing) and checks it
    /// against what the attempts allow.
    fn settle(&mut self) -> Result<()> {
        let out = match self
            .work
            .cmd()
            .args(GIT_HTTP_STALL_LIMITS)
            .args(["ls-remote", &self.url])
            .arg(format!("refs/heads/{}", self.branch))
            .timeout(self.push_timeout)
            .output()
        {
            Ok(o) if o.success() => o,
            _ => return Ok(()),
        };
        let seen = out.stdout.split_whitespace().next().map(str::to_owned);
        if seen == self.last_known {
            return Ok(());
        }
        let since_known = self.since_last_known();
        match seen
            .as_ref()
            .and_then(|s| since_known.iter().find(|&&i| &self.attempts[i].commit == s))
        {
            Some(&i) => {
                self.attempts[i].seen_applied = true;
                self.last_known = seen;
            }
            None => {
                let describe = |oid: Option<&String>| match oid
                    .and_then(|o| self.attempts.iter().position(|a| &a.commit == o))
                {
                    Some(i) => format!(
                        "attempt {i} ({:?}, ended at {:?})",
                        self.attempts[i].outcome, self.attempts[i].ended_at
                    ),
                    None => "no attempt of this pusher".to_owned(),
                };
                self.anomalies.push(format!(
                    "after attempt {} (read at {} UTC, {:?}), the branch reads {seen:?}, {}: \
                     neither the last known commit {:?}, {}, nor a push of unknown outcome \
                     made since",
                    self.attempts.len() - 1,
                    utc_time_of_day(),
                    self.started.elapsed(),
                    describe(seen.as_ref()),
                    self.last_known,
                    describe(self.last_known.as_ref()),
                ));
            }
        }
        Ok(())
    }

    /// Indexes of the unknown-outcome attempts since the last known commit
    /// was pushed (or seen).
    fn since_last_known(&self) -> Vec<usize> {
        let start = self
            .last_known
            .as_ref()
            .and_then(|k| self.attempts.iter().rposition(|a| &a.commit == k))
            .map_or(0, |i| i + 1);
        (start..self.attempts.len())
            .filter(|&i| matches!(self.attempts[i].outcome, PushOutcome::Unknown(_)))
            .collect()
    }

    pub fn attempts(&self) -> &[PushAttempt] {
        &self.attempts
    }

    /// The last commit known to be on the server: acknowledged, or seen
    /// there after an unknown outcome.
    pub fn last_known(&self) -> Option<&str> {
        self.last_known.as_deref()
    }

    /// Counts of outcomes so far.
    pub fn tally(&self) -> PushTally {
        let mut t = PushTally::default();
        for a in &self.attempts {
            match a.outcome {
                PushOutcome::Accepted => t.accepted += 1,
                PushOutcome::Rejected(_) => t.rejected += 1,
                PushOutcome::Unknown(_) => {
                    t.unknown += 1;
                    t.unknown_applied += usize::from(a.seen_applied);
                }
            }
        }
        t
    }

    /// Checks the attempts against `clone`, a fresh clone of the repository
    /// taken once no push is in flight (its `refs/remotes/origin/*` are the
    /// server's branches), and the reads made along the way.
    pub fn verify(&self, clone: &Repo) -> Result<PushTally> {
        ensure!(
            self.anomalies.is_empty(),
            "branch {}: {}",
            self.branch,
            self.anomalies.join("; ")
        );
        let tip = clone
            .cmd()
            .args(["rev-parse", "--verify", "-q"])
            .arg(format!("refs/remotes/origin/{}", self.branch))
            .output()?;
        let tip = tip.success().then(|| tip.out().to_owned());
        let rev_list = |args: &[&str]| -> Result<std::collections::HashSet<String>> {
            Ok(clone
                .run(std::iter::once("rev-list").chain(args.iter().copied()))?
                .lines()
                .map(str::to_owned)
                .collect())
        };
        let on_branch = match &tip {
            Some(t) => rev_list(&[t.as_str()])?,
            None => Default::default(),
        };
        let anywhere = rev_list(&["--all"])?;
        let mut tally = self.tally();
        for a in &self.attempts {
            match &a.outcome {
                PushOutcome::Accepted => ensure!(
                    on_branch.contains(&a.commit),
                    "acknowledged commit {} is not on {} (tip {tip:?})",
                    a.commit,
                    self.branch
                ),
                PushOutcome::Rejected(why) => ensure!(
                    !anywhere.contains(&a.commit),
                    "refused commit {} ({why}) is on the server (branch {}, tip {tip:?})",
                    a.commit,
                    self.branch
                ),
                PushOutcome::Unknown(_) if a.seen_applied => ensure!(
                    on_branch.contains(&a.commit),
                    "commit {} was seen on {} but is not there any more (tip {tip:?})",
                    a.commit,
                    self.branch
                ),
                PushOutcome::Unknown(_) => {
                    tally.unknown_applied += usize::from(anywhere.contains(&a.commit));
                }
            }
        }
        let since_known: Vec<&str> = self
            .since_last_known()
            .into_iter()
            .map(|i| self.attempts[i].commit.as_str())
            .collect();
        let tip_ok =
            tip == self.last_known || tip.as_deref().is_some_and(|t| since_known.contains(&t));
        ensure!(
            tip_ok,
            "branch {} ends at {tip:?}, which is neither the last known commit {:?} nor an \
             unknown-outcome push made after it ({since_known:?})",
            self.branch,
            self.last_known
        );
        Ok(tally)
    }
}

/// Pushers running in their own threads until stopped, each counting its
/// acknowledged pushes so the test can wait for progress.
pub struct PusherThreads {
    stop: StopOnDrop,
    accepted: Vec<Arc<AtomicUsize>>,
    handles: Vec<thread::JoinHandle<Result<BranchPusher>>>,
}

impl PusherThreads {
    pub fn start(pushers: Vec<BranchPusher>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut accepted = Vec::new();
        let mut handles = Vec::new();
        for mut p in pushers {
            let stop = Arc::clone(&stop);
            let count = Arc::new(AtomicUsize::new(0));
            accepted.push(Arc::clone(&count));
            handles.push(thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if p.push_next()?.outcome.is_accepted() {
                        count.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // No hammering while the cluster elects a leader.
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                Ok(p)
            }));
        }
        Self {
            stop: StopOnDrop(stop),
            accepted,
            handles,
        }
    }

    /// Acknowledged pushes so far, over all pushers.
    pub fn accepted(&self) -> usize {
        self.accepted.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// Waits until `more` further pushes were acknowledged.
    pub fn wait_accepted(&self, more: usize, timeout: Duration) -> Result<()> {
        let target = self.accepted() + more;
        wait_until(&format!("{more} more accepted pushes"), timeout, || {
            Ok((self.accepted() >= target).then_some(()))
        })
    }

    /// Stops the pushers after their current push and returns them.
    pub fn finish(self) -> Result<Vec<BranchPusher>> {
        drop(self.stop);
        self.handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("pusher thread panicked"))?)
            .collect()
    }
}

/// Checks every pusher against a fresh, fsck-clean clone of its repository;
/// reports every violation, not just the first.
pub fn verify_pushers(
    c: &Cluster,
    git: &Git,
    pushers: &[BranchPusher],
    repos: &[String],
) -> Result<PushTally> {
    let mut total = PushTally::default();
    let mut violations = Vec::new();
    for full in repos {
        let url = c.repo_url(full);
        let clone = git.clone_repo(&url, git.scratch("verify"), &[])?;
        clone.assert_fsck_clean()?;
        for p in pushers.iter().filter(|p| p.url == url) {
            match p.verify(&clone) {
                Ok(t) => {
                    println!("  {full} {}: {t}", p.branch);
                    total.add(&t);
                }
                Err(e) => {
                    println!("  {full} {}: VIOLATION {e:#}", p.branch);
                    violations.push(format!("{full} {}: {e:#}", p.branch));
                }
            }
        }
    }
    if !violations.is_empty() {
        print_failure_reasons(pushers);
        bail!("{}", violations.join("\n"));
    }
    Ok(total)
}

/// How many pushes failed for each reason, to see which paths were hit.
pub fn print_failure_reasons(pushers: &[BranchPusher]) {
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for a in pushers.iter().flat_map(BranchPusher::attempts) {
        let key = match &a.outcome {
            PushOutcome::Accepted => continue,
            PushOutcome::Rejected(r) => format!("rejected: {r}"),
            PushOutcome::Unknown(r) => format!("unknown: {r}"),
        };
        *reasons.entry(key).or_default() += 1;
    }
    for (r, n) in reasons {
        println!("  {n:4} × {r}");
    }
}

/// Sets a flag when dropped: stops worker threads however the test exits.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `p`-th percentile (0–100, nearest rank) of `samples`.
pub fn percentile(samples: &[Duration], p: u32) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = (v.len() * p as usize).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}

/// A router process started by [`Cluster::start_router`].
#[derive(Debug, Clone)]
pub struct ExtraRouter {
    pub pid: u32,
    /// `http://127.0.0.1:port`
    pub http_url: String,
    /// The storage nodes it was configured with.
    pub nodes: Vec<u64>,
    pub log_path: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.restarted.iter_mut().chain(&mut self.routers) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_processes();
    }
}

// ---------------------------------------------------------------------------
// Git
// ---------------------------------------------------------------------------

/// Base of the pinned author/committer clock (2023-11-14T22:13:20Z).
pub const CLOCK_BASE: u64 = 1_700_000_000;

/// An isolated git environment: its own `HOME` and a deterministic clock.
#[derive(Clone)]
pub struct Git {
    home: Arc<tempfile::TempDir>,
    clock: Arc<AtomicU64>,
    protocol: Option<u8>,
}

impl Git {
    pub fn new() -> Result<Self> {
        let home = tempfile::Builder::new()
            .prefix("cairn-e2e-home-")
            .tempdir()?;
        fs::write(
            home.path().join(".gitconfig"),
            "[init]\n\tdefaultBranch = main\n\
             [user]\n\tname = Cairn Test\n\temail = test@cairn.invalid\n\
             [advice]\n\tdetachedHead = false\n\
             [gc]\n\tauto = 0\n\
             [maintenance]\n\tauto = false\n\
             [fetch]\n\tfsckObjects = true\n\
             [credential]\n\thelper =\n",
        )?;
        Ok(Self {
            home: Arc::new(home),
            clock: Arc::new(AtomicU64::new(0)),
            protocol: None,
        })
    }

    /// The same environment, with `-c protocol.version=N` on every command.
    pub fn with_protocol(&self, v: u8) -> Self {
        Self {
            protocol: Some(v),
            ..self.clone()
        }
    }

    pub fn protocol(&self) -> Option<u8> {
        self.protocol
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// A scratch directory inside this environment's home.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.home.path().join(unique_name(name))
    }

    /// A command running in `dir`.
    pub fn cmd(&self, dir: impl AsRef<Path>) -> GitCmd {
        GitCmd {
            git: self.clone(),
            dir: dir.as_ref().to_path_buf(),
            args: Vec::new(),
            envs: Vec::new(),
            stdin: None,
            timeout: GIT_TIMEOUT,
        }
    }

    /// `git init` (non-bare) at `path`.
    pub fn init(&self, path: impl AsRef<Path>) -> Result<Repo> {
        let path = path.as_ref();
        fs::create_dir_all(path)?;
        self.cmd(path).args(["init", "-q"]).ok()?;
        Ok(self.repo(path))
    }

    /// `git init --bare` at `path`.
    pub fn init_bare(&self, path: impl AsRef<Path>) -> Result<Repo> {
        let path = path.as_ref();
        fs::create_dir_all(path)?;
        self.cmd(path).args(["init", "-q", "--bare"]).ok()?;
        Ok(self.repo(path))
    }

    /// `git clone [extra…] url dest`.
    pub fn clone_repo(&self, url: &str, dest: impl AsRef<Path>, extra: &[&str]) -> Result<Repo> {
        let dest = dest.as_ref();
        self.cmd(self.home())
            .arg("clone")
            .args(extra.iter().copied())
            .arg(url)
            .arg(dest)
            .ok()?;
        Ok(self.repo(dest))
    }

    pub fn repo(&self, path: impl AsRef<Path>) -> Repo {
        Repo {
            path: path.as_ref().to_path_buf(),
            git: self.clone(),
        }
    }

    /// `git ls-remote url` as `ref → oid` (only `refs/…`, peeled `^{}` kept
    /// under their own name).
    pub fn ls_remote(&self, url: &str) -> Result<BTreeMap<String, String>> {
        let out = self.cmd(self.home()).args(["ls-remote", url]).ok()?;
        Ok(parse_ref_listing(&out.stdout)
            .into_iter()
            .filter(|(k, _)| k.starts_with("refs/"))
            .collect())
    }

    /// Like [`Git::ls_remote`] without the peeled `^{}` entries.
    pub fn remote_refs(&self, url: &str) -> Result<BTreeMap<String, String>> {
        Ok(self
            .ls_remote(url)?
            .into_iter()
            .filter(|(k, _)| !k.ends_with("^{}"))
            .collect())
    }
}

/// Parses `oid<TAB|SP>ref` lines.
pub fn parse_ref_listing(s: &str) -> BTreeMap<String, String> {
    s.lines()
        .filter_map(|l| {
            let (oid, name) = l.split_once(['\t', ' '])?;
            Some((name.trim().to_owned(), oid.trim().to_owned()))
        })
        .collect()
}

/// Output of a finished git command.
#[derive(Debug, Clone)]
pub struct GitOutput {
    /// Command line, for messages.
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stdout_bytes: Vec<u8>,
    pub stderr: String,
}

impl GitOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Trimmed stdout.
    pub fn out(&self) -> &str {
        self.stdout.trim()
    }

    /// stdout and stderr together, lowercased (for message assertions).
    pub fn all_lower(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }
}

impl std::fmt::Display for GitOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// A git command being built.
pub struct GitCmd {
    git: Git,
    dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl GitCmd {
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    fn command_line(&self) -> String {
        let mut s = String::from("git");
        if let Some(v) = self.git.protocol {
            let _ = write!(s, " -c protocol.version={v}");
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Runs it; never fails because of the exit status.
    pub fn output(self) -> Result<GitOutput> {
        let tick = self.git.clock.fetch_add(1, Ordering::SeqCst);
        let date = format!("@{} +0000", CLOCK_BASE + tick * 60);
        let command = self.command_line();
        let mut cmd = Command::new("git");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GIT_") {
                cmd.env_remove(&k);
            }
        }
        if let Some(v) = self.git.protocol {
            cmd.arg("-c").arg(format!("protocol.version={v}"));
        }
        cmd.args(&self.args)
            .current_dir(&self.dir)
            .env("HOME", self.git.home.path())
            .env("XDG_CONFIG_HOME", self.git.home.path().join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GIT_AUTHOR_NAME", "Cairn Author")
            .env("GIT_AUTHOR_EMAIL", "author@cairn.invalid")
            .env("GIT_COMMITTER_NAME", "Cairn Committer")
            .env("GIT_COMMITTER_EMAIL", "committer@cairn.invalid")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env("NO_PROXY", "*")
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawn {command}"))?;
        let writer = match (child.stdin.take(), self.stdin) {
            (Some(mut s), Some(data)) => Some(thread::spawn(move || {
                let _ = s.write_all(&data);
            })),
            _ => None,
        };
        let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let out_t = thread::spawn(move || {
            let mut b = Vec::new();
            let _ = so.read_to_end(&mut b);
            b
        });
        let err_t = thread::spawn(move || {
            let mut b = Vec::new();
            let _ = se.read_to_end(&mut b);
            b
        });
        let status = match wait_until(&command, self.timeout, || Ok(child.try_wait()?)) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_t.join().unwrap_or_default();
                bail!(
                    "{e}; killed. stderr so far:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        let stdout_bytes = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        Ok(GitOutput {
            command,
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
            stdout_bytes,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Runs it and fails (with both streams) unless it exits 0.
    pub fn ok(self) -> Result<GitOutput> {
        let o = self.output()?;
        ensure!(o.success(), "{o}");
        Ok(o)
    }

    /// Runs it and fails unless it exits non-zero.
    pub fn fails(self) -> Result<GitOutput> {
        let o = self.output()?;
        ensure!(!o.success(), "expected a failure, but: {o}");
        Ok(o)
    }
}

/// A repository (bare or not) on disk.
#[derive(Clone)]
pub struct Repo {
    pub path: PathBuf,
    pub git: Git,
}

impl Repo {
    pub fn cmd(&self) -> GitCmd {
        self.git.cmd(&self.path)
    }

    /// Runs git with `args`; returns trimmed stdout; fails on non-zero exit.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Ok(self.cmd().args(args).ok()?.out().to_owned())
    }

    pub fn rev_parse(&self, rev: &str) -> Result<String> {
        self.run(["rev-parse", "--verify", "--end-of-options", rev])
    }

    pub fn head(&self) -> Result<String> {
        self.rev_parse("HEAD")
    }

    /// Writes `name` (creating directories) in the work tree.
    pub fn write_file(&self, name: &str, content: impl AsRef<[u8]>) -> Result<()> {
        let p = self.path.join(name);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(p, content)?;
        Ok(())
    }

    /// Writes a file, commits everything, returns the new commit id.
    pub fn commit_file(&self, name: &str, content: &str, msg: &str) -> Result<String> {
        self.write_file(name, content)?;
        self.run(["add", "-A"])?;
        self.run(["commit", "-q", "-m", msg])?;
        self.head()
    }

    /// `n` commits each appending a line to `name`; returns their ids.
    pub fn commit_n(&self, name: &str, n: usize, tag: &str) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let p = self.path.join(name);
            let mut content = fs::read_to_string(&p).unwrap_or_default();
            let _ = writeln!(content, "{tag} line {i}");
            ids.push(self.commit_file(name, &content, &format!("{tag} {i}"))?);
        }
        Ok(ids)
    }

    /// All refs (`git for-each-ref`) as `ref → oid`.
    pub fn refs(&self) -> Result<BTreeMap<String, String>> {
        let out = self.run(["for-each-ref", "--format=%(objectname) %(refname)"])?;
        Ok(parse_ref_listing(&out))
    }

    /// What a normal clone knows about its origin, expressed with the
    /// server's names: `refs/remotes/origin/X` → `refs/heads/X`, plus tags.
    pub fn origin_view(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .refs()?
            .into_iter()
            .filter_map(|(k, v)| {
                if let Some(b) = k.strip_prefix("refs/remotes/origin/") {
                    (b != "HEAD").then(|| (format!("refs/heads/{b}"), v))
                } else if k.starts_with("refs/tags/") {
                    Some((k, v))
                } else {
                    None
                }
            })
            .collect())
    }

    /// Asserts `git fsck --full` exits 0 and reports no problem.
    pub fn assert_fsck_clean(&self) -> Result<()> {
        let o = self
            .cmd()
            .args(["fsck", "--full", "--no-progress", "--no-dangling"])
            .output()?;
        let lower = o.all_lower();
        let bad = ["error", "missing", "broken", "corrupt", "bad ", "warning"];
        ensure!(
            o.success() && !bad.iter().any(|b| lower.contains(b)),
            "fsck of {} is not clean: {o}",
            self.path.display()
        );
        Ok(())
    }

    /// The repository's git dir.
    pub fn git_dir(&self) -> Result<PathBuf> {
        let d = self.run(["rev-parse", "--absolute-git-dir"])?;
        Ok(PathBuf::from(d))
    }

    /// `objects/pack/*.pack` files with their sizes.
    pub fn pack_files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = self.git_dir()?.join("objects/pack");
        let mut v = Vec::new();
        if dir.is_dir() {
            for e in fs::read_dir(dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "pack") {
                    let len = fs::metadata(&p)?.len();
                    v.push((p, len));
                }
            }
        }
        v.sort();
        Ok(v)
    }

    /// Whether `oid` is present locally (no lazy fetch).
    pub fn has_object(&self, oid: &str) -> Result<bool> {
        Ok(self
            .cmd()
            .env("GIT_NO_LAZY_FETCH", "1")
            .args(["cat-file", "-e", oid])
            .output()?
            .success())
    }

    /// Number of objects reachable from all refs that are missing locally
    /// (promised by a partial clone's remote).
    pub fn missing_object_count(&self) -> Result<usize> {
        let out = self
            .cmd()
            .env("GIT_NO_LAZY_FETCH", "1")
            .args(["rev-list", "--objects", "--all", "--missing=print"])
            .ok()?;
        Ok(out.stdout.lines().filter(|l| l.starts_with('?')).count())
    }

    /// `git pack-objects --stdout` fed with `input` (with `--revs` when
    /// asked); returns the pack bytes.
    pub fn pack_objects(&self, input: &str, revs: bool, thin: bool) -> Result<Vec<u8>> {
        let mut c = self.cmd().args(["pack-objects", "--stdout", "-q"]);
        if revs {
            c = c.arg("--revs");
        }
        if thin {
            c = c.arg("--thin");
        }
        let o = c.stdin(input.as_bytes().to_vec()).ok()?;
        Ok(o.stdout_bytes)
    }

    /// Writes raw object bytes with `hash-object --literally`.
    pub fn hash_object_literally(&self, kind: &str, data: &[u8]) -> Result<String> {
        Ok(self
            .cmd()
            .args(["hash-object", "-w", "--literally", "-t", kind, "--stdin"])
            .stdin(data.to_vec())
            .ok()?
            .out()
            .to_owned())
    }
}

/// Asserts a clone is healthy and mirrors `expected` (server refs, e.g. from
/// [`Git::remote_refs`]): fsck clean, and its origin view equals `expected`.
pub fn assert_clone_matches(clone: &Repo, expected: &BTreeMap<String, String>) -> Result<()> {
    clone.assert_fsck_clean()?;
    let view = clone.origin_view()?;
    ensure!(
        &view == expected,
        "refs of clone {} differ from the server's:\n clone:  {view:?}\n server: {expected:?}",
        clone.path.display()
    );
    Ok(())
}

/// Decodes a 40-hex object id into 20 bytes.
pub fn oid_bytes(hex: &str) -> Result<[u8; 20]> {
    ensure!(hex.len() == 40, "not a SHA-1 hex id: {hex:?}");
    let mut out = [0u8; 20];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("bad hex {hex:?}"))?;
    }
    Ok(out)
}

/// The all-zero object id.
pub const ZERO_OID: &str = "0000000000000000000000000000000000000000";

// ---------------------------------------------------------------------------
// pkt-line and raw protocol bodies
// ---------------------------------------------------------------------------

/// One pkt-line carrying `data`.
pub fn pkt_line(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", data.len() + 4).into_bytes();
    v.extend_from_slice(data);
    v
}

pub const FLUSH_PKT: &[u8] = b"0000";
pub const DELIM_PKT: &[u8] = b"0001";

/// A decoded pkt-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    Flush,
    Delim,
    ResponseEnd,
    Data(Vec<u8>),
}

/// Decodes pkt-lines; stops (returning what was decoded and the offset) at
/// the first thing that is not a pkt-line, e.g. a raw pack.
pub fn parse_pkt_lines(mut b: &[u8]) -> (Vec<Pkt>, usize) {
    let total = b.len();
    let mut v = Vec::new();
    while b.len() >= 4 {
        let Some(len) = std::str::from_utf8(&b[..4])
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
        else {
            break;
        };
        match len {
            0 => v.push(Pkt::Flush),
            1 => v.push(Pkt::Delim),
            2 => v.push(Pkt::ResponseEnd),
            3 => break,
            n if n > b.len() => break,
            n => v.push(Pkt::Data(b[4..n].to_vec())),
        }
        b = &b[len.max(4)..];
    }
    (v, total - b.len())
}

/// Text of a response whose pkt-lines may be side-band multiplexed: band 1
/// (if it is pkt-lines) and band 2/3 payloads are concatenated; non-band
/// data lines are kept as they are.
pub fn pkt_text(body: &[u8]) -> String {
    let (pkts, _) = parse_pkt_lines(body);
    let mut out = String::new();
    for p in pkts {
        if let Pkt::Data(d) = p {
            match d.first() {
                Some(1) => {
                    let (inner, _) = parse_pkt_lines(&d[1..]);
                    if inner.is_empty() {
                        out.push_str(&String::from_utf8_lossy(&d[1..]));
                    }
                    for ip in inner {
                        if let Pkt::Data(x) = ip {
                            out.push_str(&String::from_utf8_lossy(&x));
                        }
                    }
                }
                Some(2) | Some(3) => out.push_str(&String::from_utf8_lossy(&d[1..])),
                _ => out.push_str(&String::from_utf8_lossy(&d)),
            }
        }
    }
    out
}

/// One ref update of a push.
#[derive(Debug, Clone)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

impl RefUpdate {
    pub fn new(old: &str, new: &str, name: &str) -> Self {
        Self {
            old: old.to_owned(),
            new: new.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// A v0 `git-receive-pack` request body: command pkt-lines (capabilities on
/// the first), a flush, then the pack (if any).
pub fn receive_pack_body(updates: &[RefUpdate], caps: &str, pack: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, u) in updates.iter().enumerate() {
        let mut line = format!("{} {} {}", u.old, u.new, u.name).into_bytes();
        if i == 0 {
            line.push(0);
            line.extend_from_slice(caps.as_bytes());
        }
        line.push(b'\n');
        body.extend(pkt_line(&line));
    }
    body.extend_from_slice(FLUSH_PKT);
    body.extend_from_slice(pack);
    body
}

/// The report of a receive-pack response (`report-status`).
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    /// The `unpack …` status (`"ok"` or an error text), if reported.
    pub unpack: Option<String>,
    /// `ref → None` for `ok`, `Some(reason)` for `ng`.
    pub refs: BTreeMap<String, Option<String>>,
    /// Everything readable in the response (status lines, side-band text).
    pub text: String,
}

impl PushReport {
    pub fn parse(body: &[u8]) -> Self {
        let text = pkt_text(body);
        let mut r = PushReport {
            text: text.clone(),
            ..Default::default()
        };
        for line in text.lines() {
            if let Some(s) = line.strip_prefix("unpack ") {
                r.unpack = Some(s.trim().to_owned());
            } else if let Some(s) = line.strip_prefix("ok ") {
                r.refs.insert(s.trim().to_owned(), None);
            } else if let Some(s) = line.strip_prefix("ng ") {
                let (name, reason) = s.split_once(' ').unwrap_or((s, ""));
                r.refs
                    .insert(name.trim().to_owned(), Some(reason.trim().to_owned()));
            }
        }
        r
    }

    /// Whether any ref update was reported as applied.
    pub fn any_ok(&self) -> bool {
        self.refs.values().any(Option::is_none)
    }
}

/// Recomputes the SHA-1 trailer of a pack whose bytes were altered (uses the
/// system `sha1sum`).
pub fn fix_pack_trailer(pack: &mut Vec<u8>) -> Result<()> {
    ensure!(pack.len() > 32, "pack too short");
    let body_len = pack.len() - 20;
    let mut child = Command::new("sha1sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("sha1sum")?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("stdin"))?;
    let data = pack[..body_len].to_vec();
    let w = thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let _ = w.join();
    let hex = String::from_utf8_lossy(&out.stdout);
    let hex = hex.split_whitespace().next().unwrap_or_default();
    let sum = oid_bytes(hex)?;
    pack.truncate(body_len);
    pack.extend_from_slice(&sum);
    Ok(())
}

/// Offset of the first object's zlib data in a pack (after the 12-byte pack
/// header and the object's type/size header and delta base, if any).
pub fn first_object_data_offset(pack: &[u8]) -> Result<usize> {
    ensure!(pack.len() > 12 && &pack[..4] == b"PACK", "not a pack");
    let mut pos = 12;
    let mut c = pack[pos];
    let kind = (c >> 4) & 7;
    pos += 1;
    while c & 0x80 != 0 {
        c = pack[pos];
        pos += 1;
    }
    match kind {
        6 => {
            // ofs-delta: variable-length negative offset follows
            let mut c = pack[pos];
            pos += 1;
            while c & 0x80 != 0 {
                c = pack[pos];
                pos += 1;
            }
        }
        7 => pos += 20,
        _ => {}
    }
    Ok(pos)
}

// ---------------------------------------------------------------------------
// Deterministic history generator
// ---------------------------------------------------------------------------

/// SplitMix64: small, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "alpha", "beta", "gamma", "delta", "stone", "cairn", "ridge", "path", "summit", "trail",
    "marker", "granite", "moss", "valley", "north", "south", "river", "bridge", "cloud", "storm",
    "ledger", "object", "commit", "branch", "merge", "packet", "index", "delta", "window", "depth",
    "return", "match", "struct", "impl", "let", "mut", "fn", "self", "where", "loop",
];

/// Generates a long linear history as a `git fast-import` stream: a handful
/// of files of a few hundred lines, each commit changing a few lines of one
/// or two files, so that git finds real deltas. Streams continue where the
/// previous one stopped (same branch), so a history can be extended.
#[derive(Debug, Clone)]
pub struct HistoryGen {
    rng: Rng,
    files: Vec<(String, Vec<String>)>,
    commits: u64,
    time: u64,
    next_line_id: u64,
}

impl HistoryGen {
    pub fn new(seed: u64, n_files: usize, lines_per_file: usize) -> Self {
        let mut g = Self {
            rng: Rng::new(seed),
            files: Vec::new(),
            commits: 0,
            time: CLOCK_BASE,
            next_line_id: 0,
        };
        for f in 0..n_files {
            let name = match f % 3 {
                0 => format!("src/module_{f}.rs"),
                1 => format!("docs/chapter_{f}.md"),
                _ => format!("data/table_{f}.txt"),
            };
            let lines = (0..lines_per_file).map(|_| g.line()).collect();
            g.files.push((name, lines));
        }
        g
    }

    fn line(&mut self) -> String {
        let id = self.next_line_id;
        self.next_line_id += 1;
        let n = 4 + self.rng.below(8);
        let mut s = format!("{id:06}:");
        for _ in 0..n {
            s.push(' ');
            s.push_str(WORDS[self.rng.below(WORDS.len())]);
        }
        s
    }

    /// Number of commits generated so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    fn mutate(&mut self) -> Vec<usize> {
        let n_touch = 1 + self.rng.below(2);
        let mut touched = Vec::new();
        for _ in 0..n_touch {
            let f = self.rng.below(self.files.len());
            let edits = 1 + self.rng.below(3);
            for _ in 0..edits {
                let len = self.files[f].1.len();
                let at = self.rng.below(len.max(1));
                let op = self.rng.below(10);
                let new_line = self.line();
                let lines = &mut self.files[f].1;
                match op {
                    0..=5 => {
                        if len > 0 {
                            lines[at] = new_line;
                        }
                    }
                    6..=7 => lines.insert(at, new_line),
                    _ => {
                        if len > 50 {
                            lines.remove(at);
                        } else {
                            lines.insert(at, new_line);
                        }
                    }
                }
            }
            touched.push(f);
        }
        touched.sort_unstable();
        touched.dedup();
        touched
    }

    /// A fast-import stream of `n` more commits on `branch`.
    pub fn stream(&mut self, branch: &str, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let touched: Vec<usize> = if self.commits == 0 {
                (0..self.files.len()).collect()
            } else {
                self.mutate()
            };
            self.commits += 1;
            self.time += 37 + self.rng.below(600) as u64;
            let msg = format!(
                "Commit {}: update {}\n\nGenerated change number {} touching {} file(s).\n",
                self.commits,
                self.files[touched[0]].0,
                self.commits,
                touched.len()
            );
            let _ = write!(
                out,
                "commit refs/heads/{branch}\n\
                 author Gen Author <gen@cairn.invalid> {t} +0000\n\
                 committer Gen Committer <gen@cairn.invalid> {t} +0000\n\
                 data {}\n{msg}\n",
                msg.len(),
                t = self.time
            );
            if i == 0 && self.commits > 1 {
                let _ = writeln!(out, "from refs/heads/{branch}^0");
            }
            for &f in &touched {
                let (name, lines) = &self.files[f];
                let mut content = lines.join("\n");
                content.push('\n');
                let _ = write!(out, "M 100644 inline {name}\ndata {}\n", content.len());
                out.extend_from_slice(content.as_bytes());
                out.push(b'\n');
            }
            out.push(b'\n');
        }
        out
    }

    /// Imports `n` more commits into `repo` on `branch`.
    pub fn import(&mut self, repo: &Repo, branch: &str, n: usize) -> Result<()> {
        let stream = self.stream(branch, n);
        repo.cmd()
            .args(["fast-import", "--quiet", "--done"])
            .stdin({
                let mut s = stream;
                s.extend_from_slice(b"done\n");
                s
            })
            .timeout(Duration::from_secs(600))
            .ok()?;
        Ok(())
    }
}

/// Size in bytes of the pack the client received during `cmd`, read from
/// `GIT_TRACE_PACKFILE`: runs `cmd` with the trace pointed at a scratch file.
pub fn received_pack_size(git: &Git, cmd: GitCmd) -> Result<(GitOutput, u64)> {
    let trace = git.scratch("pack-trace");
    let o = cmd
        .env("GIT_TRACE_PACKFILE", &trace.display().to_string())
        .ok()?;
    let data = fs::read(&trace).with_context(|| format!("no pack trace written for {o}"))?;
    ensure!(
        data.starts_with(b"PACK"),
        "pack trace does not start with PACK ({} bytes)",
        data.len()
    );
    ensure!(
        find(&data[4..], b"PACK\x00\x00\x00\x02").is_none() || data.len() < 64,
        "pack trace seems to hold more than one pack"
    );
    let _ = fs::remove_file(&trace);
    Ok((o, data.len() as u64))
}

/// A commit (child of `parent`) whose root tree holds a tree named `name`
/// (e.g. `.git`) with a `config` file in it, next to a README.
pub fn commit_with_dot_git_tree(repo: &Repo, name: &str, parent: &str) -> Result<String> {
    let cfg = repo
        .cmd()
        .args(["hash-object", "-w", "--stdin"])
        .stdin(b"[core]\n\tbare = false\n".to_vec())
        .ok()?
        .out()
        .to_owned();
    let readme = repo
        .cmd()
        .args(["hash-object", "-w", "--stdin"])
        .stdin(b"hello\n".to_vec())
        .ok()?
        .out()
        .to_owned();
    let mut inner = b"100644 config\0".to_vec();
    inner.extend_from_slice(&oid_bytes(&cfg)?);
    let inner = repo.hash_object_literally("tree", &inner)?;
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut e = format!("40000 {name}\0").into_bytes();
    e.extend_from_slice(&oid_bytes(&inner)?);
    entries.insert(format!("{name}/"), e);
    let mut e = b"100644 README\0".to_vec();
    e.extend_from_slice(&oid_bytes(&readme)?);
    entries.insert("README".to_owned(), e);
    let outer: Vec<u8> = entries.into_values().flatten().collect();
    let outer = repo.hash_object_literally("tree", &outer)?;
    repo.run([
        "commit-tree",
        &outer,
        "-p",
        parent,
        "-m",
        "add a nested git dir",
    ])
}

/// Runs stock `git <service> --stateless-rpc <repo>` on a request body, as
/// `git http-backend` would for a POST: the reference behaviour the raw
/// protocol tests are checked against. `service` is `receive-pack` or
/// `upload-pack`; `v2` sets `GIT_PROTOCOL=version=2`.
pub fn stock_stateless_rpc(repo: &Repo, service: &str, body: &[u8], v2: bool) -> Result<GitOutput> {
    let mut c = repo
        .git
        .cmd(&repo.path)
        .args([service, "--stateless-rpc", "."])
        .stdin(body.to_vec());
    if v2 {
        c = c.env("GIT_PROTOCOL", "version=2");
    }
    c.output()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn pkt_lines_round_trip() {
        let mut b = pkt_line(b"hello\n");
        b.extend_from_slice(FLUSH_PKT);
        b.extend_from_slice(b"PACK...");
        let (pkts, used) = parse_pkt_lines(&b);
        assert_eq!(pkts, vec![Pkt::Data(b"hello\n".to_vec()), Pkt::Flush]);
        assert_eq!(used, 14);
    }

    #[test]
    fn http_parse_chunked_and_length() -> Result<()> {
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        )?
        .ok_or_else(|| anyhow!("incomplete"))?;
        assert_eq!(r.body, b"abcde");
        let r = parse_http_response(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
            false,
        )?
        .ok_or_else(|| anyhow!("incomplete"))?;
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no"[..]));
        assert!(
            parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", false)?
                .is_none()
        );
        Ok(())
    }

    #[test]
    fn push_report_parses_side_band() {
        let inner = [
            pkt_line(b"unpack ok\n"),
            pkt_line(b"ok refs/heads/main\n"),
            pkt_line(b"ng refs/heads/b stale info\n"),
            FLUSH_PKT.to_vec(),
        ]
        .concat();
        let mut band = vec![1u8];
        band.extend_from_slice(&inner);
        let body = [pkt_line(&band), FLUSH_PKT.to_vec()].concat();
        let r = PushReport::parse(&body);
        assert_eq!(r.unpack.as_deref(), Some("ok"));
        assert_eq!(r.refs.get("refs/heads/main"), Some(&None));
        assert_eq!(
            r.refs.get("refs/heads/b"),
            Some(&Some("stale info".to_owned()))
        );
    }
}

// ---------------------------------------------------------------------------
// The cluster directory (gRPC `cairn.cluster.v1.Cluster` on each storage node)
// ---------------------------------------------------------------------------

// In a module of its own so that it may follow the unit tests above.
pub use cluster_directory::*;

/// Helpers over the `Cluster` service: `ClusterStatus` and friends.
mod cluster_directory {
    use super::*;

    pub use cairn_proto::cluster::{
        ClusterStatusResponse, NodeState as DirectoryNodeState, ReplicaReport, ShardReport,
    };

    /// Time limit of one `Cluster` call: `ClusterStatus` asks every node (5 s
    /// each at most) besides reading the directory from the meta leader.
    const CLUSTER_CALL_TIMEOUT: Duration = Duration::from_secs(30);

    impl Cluster {
        /// Runs `call` against storage node `node`'s `Cluster` service over a
        /// fresh connection and blocks for the answer (as [`Cluster::admin_rpc`]
        /// does for the Admin service). A gRPC error stays reachable through
        /// [`grpc_code`].
        pub fn cluster_rpc<T, F, Fut>(&self, node: u64, call: F) -> Result<T>
        where
            F: FnOnce(
                cairn_proto::cluster::cluster_client::ClusterClient<tonic::transport::Channel>,
            ) -> Fut,
            Fut: std::future::Future<
                Output = std::result::Result<tonic::Response<T>, tonic::Status>,
            >,
        {
            let url = format!("http://{}", self.node_grpc_addr(node)?);
            admin_runtime().block_on(async move {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                    .connect_timeout(ADMIN_CONNECT_TIMEOUT)
                    .timeout(CLUSTER_CALL_TIMEOUT)
                    .connect()
                    .await
                    .with_context(|| format!("connect to node {node} at {url}"))?;
                let client = cairn_proto::cluster::cluster_client::ClusterClient::new(channel);
                let resp = tokio::time::timeout(CLUSTER_CALL_TIMEOUT, call(client))
                    .await
                    .with_context(|| format!("cluster call to node {node} timed out"))?
                    .map_err(|s| {
                        anyhow::Error::new(s).context(format!("cluster call to node {node}"))
                    })?;
                Ok(resp.into_inner())
            })
        }

        /// `ClusterStatus` as storage node `node` answers it.
        pub fn cluster_status(&self, node: u64) -> Result<ClusterStatusResponse> {
            self.cluster_rpc(node, |mut c| async move {
                c.cluster_status(cairn_proto::cluster::ClusterStatusRequest {})
                    .await
            })
        }

        /// `ClusterStatus` from the first node (ascending id) that answers;
        /// the error names every node's failure.
        pub fn cluster_status_any(&self) -> Result<ClusterStatusResponse> {
            let mut errors = Vec::new();
            for id in self.node_ids() {
                match self.cluster_status(id) {
                    Ok(s) => return Ok(s),
                    Err(e) => errors.push(format!("node {id}: {e:#}")),
                }
            }
            bail!("no node answered ClusterStatus: {}", errors.join("; "))
        }

        /// Waits until the cluster directory, bootstrapped in the background
        /// after the first election, lists at least one shard.
        pub fn wait_directory(&self, timeout: Duration) -> Result<ClusterStatusResponse> {
            wait_until("the cluster directory to list a shard", timeout, || {
                Ok(self
                    .cluster_status_any()
                    .ok()
                    .filter(|s| s.shards.iter().any(|s| s.placement.is_some())))
            })
        }

        /// Starts `cairn ARGS --node <node's URL>` with stdout and stderr piped
        /// (e.g. a move to interrupt while it runs). The caller reaps it.
        pub fn spawn_cli_at(&self, node: u64, args: &[&str]) -> Result<Child> {
            let url = format!("http://{}", self.node_grpc_addr(node)?);
            Command::new(cairn_bin()?)
                .args(args)
                .arg("--node")
                .arg(url)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn cairn")
        }
    }

    /// The report of shard `shard` in a `ClusterStatus` answer.
    /// The report of `shard`; shard 0 is the meta group.
    pub fn shard_report(status: &ClusterStatusResponse, shard: u64) -> Result<&ShardReport> {
        status
            .meta
            .iter()
            .chain(&status.shards)
            .find(|s| s.placement.as_ref().is_some_and(|p| p.shard_id == shard))
            .ok_or_else(|| anyhow!("ClusterStatus lists no shard {shard}"))
    }

    /// The id of a shard report (0 without placement).
    pub fn shard_id_of(report: &ShardReport) -> u64 {
        report.placement.as_ref().map_or(0, |p| p.shard_id)
    }

    /// The shard `ClusterStatus` lists repository `workspace/slug` on.
    pub fn shard_of_repo(status: &ClusterStatusResponse, full_name: &str) -> Option<u64> {
        let (ws, slug) = full_name.split_once('/')?;
        status
            .shards
            .iter()
            .find(|s| s.repos.iter().any(|r| r.workspace == ws && r.slug == slug))
            .map(shard_id_of)
    }

    /// How many shards count each node among their voters (every registered
    /// node listed, with 0 if it holds none).
    pub fn voters_per_node(status: &ClusterStatusResponse) -> BTreeMap<u64, usize> {
        let mut m: BTreeMap<u64, usize> = status.nodes.iter().map(|n| (n.id, 0)).collect();
        for s in &status.shards {
            for v in &s.voters {
                *m.entry(*v).or_default() += 1;
            }
        }
        m
    }

    /// The directory state of node `id` in a `ClusterStatus` answer.
    pub fn directory_node_state(
        status: &ClusterStatusResponse,
        id: u64,
    ) -> Option<DirectoryNodeState> {
        status
            .nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| DirectoryNodeState::try_from(n.state).ok())
    }

    /// A compact multi-line rendering of a `ClusterStatus` answer, for
    /// messages: nodes with their states, then per shard its placement,
    /// leader, voters, learners, move and replica roles.
    pub fn describe_cluster_status(status: &ClusterStatusResponse) -> String {
        let mut out = String::new();
        let nodes: Vec<String> = status
            .nodes
            .iter()
            .map(|n| {
                let state = DirectoryNodeState::try_from(n.state).map_or_else(
                    |_| format!("state {}", n.state),
                    |s| s.as_str_name().to_owned(),
                );
                format!("{}={state}", n.id)
            })
            .collect();
        let _ = writeln!(
            out,
            "epoch {} meta voters {:?} leader {}; nodes {}",
            status.map_epoch,
            status.meta_voters,
            status.meta_leader,
            nodes.join(" ")
        );
        for s in status.meta.iter().chain(&status.shards) {
            let roles: Vec<String> = s
                .replicas
                .iter()
                .map(|r| {
                    if r.error.is_empty() {
                        format!("{}:{}@{}", r.node_id, r.role, r.applied_index)
                    } else {
                        format!("{}:{} ({})", r.node_id, r.role, r.error)
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "  shard {}: placement {:?} leader {} voters {:?} learners {:?} moving {:?} repos {} \
                 replicas [{}]",
                shard_id_of(s),
                s.placement
                    .as_ref()
                    .map(|p| p.replicas.clone())
                    .unwrap_or_default(),
                s.leader_id,
                s.voters,
                s.learners,
                s.moving,
                s.repos.len(),
                roles.join(", ")
            );
        }
        out
    }
}

// Shared by the bad-input suites: a repository to attack, raw requests, and
// the check that it stayed intact.

/// A repository with `main` (3 commits) and `side`, and a clone of it.
pub struct Base {
    pub git: Git,
    pub full: String,
    pub url: String,
    pub work: Repo,
    pub before: BTreeMap<String, String>,
}

pub fn base(c: &Cluster, prefix: &str) -> Result<Base> {
    let git = Git::new()?.with_protocol(2);
    let full = c.new_repo(prefix)?;
    let url = c.repo_url(&full);
    let seed = git.init(git.scratch("seed"))?;
    seed.commit_n("file.txt", 3, "base")?;
    seed.run(["branch", "side", "main~1"])?;
    seed.run(["push", "-q", &url, "main", "side"])?;
    let work = git.clone_repo(&url, git.scratch("work"), &["-q"])?;
    let before = git.remote_refs(&url)?;
    ensure!(before.len() == 2, "{before:?}");
    // What the pack checks compare is real: the seeded pack is seen on
    // every replica.
    let seeded = c.pack_files(&full)?;
    ensure!(
        seeded
            .iter()
            .filter(|p| p.to_string_lossy().contains("/packs/"))
            .count()
            >= 2 * c.node_ids().len().min(3),
        "the seeded pack (and index) on every replica: {seeded:?}"
    );
    Ok(Base {
        git,
        full,
        url,
        work,
        before,
    })
}

/// The refs are unchanged and a fresh clone (v0 and v2) is complete.
pub fn assert_intact(c: &Cluster, b: &Base) -> Result<()> {
    let now = b.git.remote_refs(&b.url)?;
    ensure!(now == b.before, "refs changed: {:?} -> {now:?}", b.before);
    let r = HttpRequest::new("GET", "/healthz").send(c.http_url())?;
    ensure!(r.status == 200, "healthz after bad input: {}", r.status);
    for v in [0u8, 2] {
        let g = b.git.with_protocol(v);
        let clone = g.clone_repo(&b.url, g.scratch("check"), &["-q"])?;
        assert_clone_matches(&clone, &b.before)?;
    }
    Ok(())
}

pub fn post(c: &Cluster, full: &str, service: &str, body: &[u8], v2: bool) -> Result<HttpResponse> {
    let path = format!("/{full}.git/{service}");
    let mut req = c
        .request("POST", &path)
        .header("Content-Type", &format!("application/x-{service}-request"))
        .header("Accept", &format!("application/x-{service}-result"))
        .body(body);
    if v2 {
        req = req.header("Git-Protocol", "version=2");
    }
    req.send(c.http_url())
}

/// Whether a response clearly reports an error (HTTP status, `ERR` packet,
/// fatal side-band message, failed unpack or a rejected ref).
pub fn is_error(r: &HttpResponse) -> bool {
    if r.status >= 400 {
        return true;
    }
    let rep = PushReport::parse(&r.body);
    let text = rep.text.to_lowercase();
    let raw = r.text().to_lowercase();
    rep.unpack.as_deref().is_some_and(|u| u != "ok")
        || rep.refs.values().any(Option::is_some)
        || text.contains("err ")
        || raw.contains("err ")
        || text.contains("fatal")
        || text.contains("error")
}

pub fn describe(r: &HttpResponse) -> String {
    format!(
        "HTTP {} {:?}: {:?}",
        r.status,
        r.header("content-type"),
        String::from_utf8_lossy(&r.body[..r.body.len().min(600)])
    )
}

/// A new commit on top of main in the work clone and a complete pack
/// (non-thin) of what the server lacks.
pub fn new_commit_and_pack(b: &Base, name: &str) -> Result<(RefUpdate, Vec<u8>)> {
    let old = b.before["refs/heads/main"].clone();
    b.work.run(["reset", "-q", "--hard", &old])?;
    let new = b.work.commit_file(
        &format!("{name}.txt"),
        &format!("content of {name}\n"),
        name,
    )?;
    let pack = b
        .work
        .pack_objects(&format!("{new}\n^{old}\n"), true, false)?;
    Ok((RefUpdate::new(&old, &new, "refs/heads/main"), pack))
}

/// Sends a raw push that must be refused; checks that it was, with an
/// error reported and the refs unchanged. Returns the response.
pub fn push_raw(
    c: &Cluster,
    b: &Base,
    what: &str,
    updates: &[RefUpdate],
    pack: &[u8],
) -> Result<HttpResponse> {
    let packs = c.pack_files(&b.full)?;
    let body = receive_pack_body(updates, "report-status agent=cairn-tests", pack);
    let r = post(c, &b.full, "git-receive-pack", &body, false)?;
    let rep = PushReport::parse(&r.body);
    eprintln!("{what}: {}", describe(&r));
    ensure!(
        !rep.any_ok(),
        "{what}: the server accepted it: {}",
        describe(&r)
    );
    ensure!(is_error(&r), "{what}: no error reported: {}", describe(&r));
    let now = b.git.remote_refs(&b.url)?;
    ensure!(now == b.before, "{what}: refs changed: {now:?}");
    c.assert_pack_files(&b.full, &packs, what)?;
    Ok(r)
}
