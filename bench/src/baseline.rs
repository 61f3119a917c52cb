//! The baseline an operator would otherwise run: nginx in front of fcgiwrap
//! running `git http-backend`, serving bare repositories over smart HTTP
//! (protocol v2 included) on 127.0.0.1.
//!
//! Everything the servers write (pid file, logs, temp files, the FastCGI
//! socket, the repositories) lives under one work directory, so a run leaves
//! nothing behind in the system's own nginx setup. nginx and fcgiwrap come
//! from Debian's packages; git is whichever `git` is first on `PATH`.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::procs;

/// How long the servers get to come up, and to go away, before we give up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const ZOMBIE_GRACE: Duration = Duration::from_secs(3);

/// Installs nginx and fcgiwrap from Debian's packages when missing
/// (apt-get update + install -y, DEBIAN_FRONTEND=noninteractive; sudo when
/// not root). Idempotent, quiet when all present.
pub fn setup() -> Result<()> {
    if find_program("nginx").is_some() && find_program("fcgiwrap").is_some() {
        return Ok(());
    }
    eprintln!("baseline: installing nginx and fcgiwrap from Debian's packages");
    let root = is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            // sudo drops most of the environment, so the frontend is passed
            // as an assignment sudo itself applies.
            let mut c = Command::new("sudo");
            c.arg("DEBIAN_FRONTEND=noninteractive").arg("apt-get");
            c
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .arg("-qq")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let status = cmd
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update"])?;
    // Recommends would pull in extras we never start; the packages' own
    // service units are never used either, we run both servers ourselves.
    apt(&[
        "install",
        "-y",
        "--no-install-recommends",
        "nginx",
        "fcgiwrap",
    ])?;
    if find_program("nginx").is_none() || find_program("fcgiwrap").is_none() {
        bail!("nginx or fcgiwrap still missing after apt-get install");
    }
    Ok(())
}

/// nginx + fcgiwrap + `git http-backend`, running until stopped or dropped.
pub struct Baseline {
    work: PathBuf,
    repos: PathBuf,
    socket: PathBuf,
    port: u16,
    nginx: Option<Child>,
    fcgiwrap: Option<Child>,
    fcgiwrap_pid: u32,
}

impl Baseline {
    /// Starts fcgiwrap (on a unix socket in `work`, with `workers` children)
    /// and nginx (master plus one worker per core) listening on 127.0.0.1 at
    /// a free port, with repositories under `<work>/repos`. Waits until it
    /// answers HTTP. Pid/log/temp paths all under `work`.
    pub fn start(work: &Path, workers: u32) -> Result<Baseline> {
        Self::start_with(work, workers, None)
    }

    /// Like [`Baseline::start`]; with `meter`, a second route
    /// (`/metered/<repo>.git`) runs `git http-backend` under that program,
    /// which records the CPU time of the backend and its git children (see
    /// [`Baseline::metered_cpu`]). fcgiwrap's workers ignore SIGCHLD, so the
    /// kernel discards that time otherwise.
    pub fn start_with(work: &Path, workers: u32, meter: Option<&Path>) -> Result<Baseline> {
        let nginx_bin = find_program("nginx")
            .ok_or_else(|| anyhow!("nginx not found; run baseline::setup() first"))?;
        let fcgiwrap_bin = find_program("fcgiwrap")
            .ok_or_else(|| anyhow!("fcgiwrap not found; run baseline::setup() first"))?;
        let git_bin = find_program("git").ok_or_else(|| anyhow!("git not found on PATH"))?;
        let backend = http_backend_path(&git_bin)?;

        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let work = work
            .canonicalize()
            .with_context(|| format!("resolving {}", work.display()))?;
        check_conf_safe(&work)?;
        let repos = work.join("repos");
        fs::create_dir_all(&repos)?;
        fs::create_dir_all(work.join("nginx-tmp"))?;

        let socket = work.join("fcgiwrap.sock");
        // sun_path holds 108 bytes including the terminator.
        if socket.as_os_str().len() >= 108 {
            bail!("fcgiwrap socket path too long: {}", socket.display());
        }
        let _ = fs::remove_file(&socket);

        let fcgi_log = fs::File::create(work.join("fcgiwrap.log"))?;
        let fcgiwrap = Command::new(&fcgiwrap_bin)
            .arg("-c")
            .arg(workers.max(1).to_string())
            .arg("-s")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(fcgi_log.try_clone()?)
            .stderr(fcgi_log)
            .spawn()
            .with_context(|| format!("starting {}", fcgiwrap_bin.display()))?;
        let fcgiwrap_pid = fcgiwrap.id();
        // From here on Drop cleans up whatever has been started.
        let mut me = Baseline {
            work: work.clone(),
            repos,
            socket,
            port: 0,
            nginx: None,
            fcgiwrap: Some(fcgiwrap),
            fcgiwrap_pid,
        };
        me.wait_for_socket()?;

        let path_env = cgi_path(&git_bin);
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let conf = work.join("nginx.conf");
        let stderr_path = work.join("nginx.stderr");
        let mut last_err = anyhow!("nginx did not start");
        // The port is picked by binding and releasing it, so another process
        // can grab it in between; a few attempts make that race harmless.
        for _ in 0..5 {
            let port = free_port()?;
            fs::write(
                &conf,
                nginx_conf(&me, port, cores, &backend, &path_env, workers, meter),
            )?;
            let stderr = fs::File::create(&stderr_path)?;
            let nginx = Command::new(&nginx_bin)
                .arg("-p")
                .arg(&work)
                .arg("-c")
                .arg(&conf)
                // Without -e nginx first tries the compiled-in
                // /var/log/nginx/error.log, before reading the config.
                .arg("-e")
                .arg(work.join("nginx-error.log"))
                .arg("-g")
                .arg("daemon off;")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting {}", nginx_bin.display()))?;
            me.nginx = Some(nginx);
            me.port = port;
            match me.wait_for_http() {
                Ok(()) => return Ok(me),
                Err(e) => {
                    last_err = e;
                    me.stop_nginx();
                }
            }
        }
        Err(last_err)
    }

    /// Clone URL of repository `name` (e.g. "bench/small" →
    /// http://127.0.0.1:PORT/bench/small.git).
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{}.git", self.port, name)
    }

    /// The URL of `name` through the metered route (started with a meter).
    pub fn metered_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/metered/{}.git", self.port, name)
    }

    /// CPU seconds the metered route's backends (with their children) have
    /// used so far.
    pub fn metered_cpu(&self) -> f64 {
        fs::read_to_string(self.work.join(METER_LOG))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .sum()
    }

    /// Puts a copy of the bare repository `from` at `name` (a local
    /// `git clone --mirror`, keeping its packs, then `git repack -a -d -b`
    /// only if it has more than one pack) and enables pushes.
    pub fn add_repo(&self, name: &str, from: &Path) -> Result<()> {
        let dest = self.repo_path(name)?;
        if dest.exists() {
            bail!("repository {} already exists", dest.display());
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        // A local clone hard-links (or copies) the source's pack files as
        // they are, so both servers serve byte-identical packs.
        git(
            None,
            [
                OsStr::new("clone"),
                OsStr::new("--quiet"),
                OsStr::new("--mirror"),
                from.as_os_str(),
                dest.as_os_str(),
            ],
        )?;
        if count_packs(&dest)? > 1 {
            git(Some(&dest), ["repack", "-a", "-d", "-b", "-q"])?;
        }
        enable_push(&dest)
    }

    /// An empty bare repository `name` (HEAD → refs/heads/main) that accepts
    /// pushes.
    pub fn create_empty(&self, name: &str) -> Result<()> {
        let dest = self.repo_path(name)?;
        if dest.exists() {
            bail!("repository {} already exists", dest.display());
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        git(
            None,
            [
                OsStr::new("init"),
                OsStr::new("--quiet"),
                OsStr::new("--bare"),
                OsStr::new("--initial-branch=main"),
                dest.as_os_str(),
            ],
        )?;
        enable_push(&dest)
    }

    /// Pids of every long-lived server process: the nginx master and
    /// workers, and fcgiwrap (parent and its children).
    pub fn server_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Some(nginx) = &self.nginx {
            pids.push(nginx.id());
            pids.extend(procs::children_of(nginx.id()));
        }
        if self.fcgiwrap.is_some() {
            pids.push(self.fcgiwrap_pid);
            pids.extend(procs::children_of(self.fcgiwrap_pid));
        }
        pids
    }

    /// The pid of fcgiwrap's main process (git http-backend and its git
    /// children run beneath it).
    pub fn fcgiwrap_pid(&self) -> u32 {
        self.fcgiwrap_pid
    }

    /// Stops nginx and fcgiwrap and waits for them.
    pub fn stop(&mut self) {
        // nginx first, so no request reaches a half-dead fcgiwrap.
        self.stop_nginx();
        self.stop_fcgiwrap();
        let _ = fs::remove_file(&self.socket);
    }

    fn stop_nginx(&mut self) {
        let Some(mut nginx) = self.nginx.take() else {
            return;
        };
        let master = nginx.id();
        let workers = procs::children_of(master);
        // TERM is nginx's fast shutdown: the master stops its workers and
        // waits for them before exiting.
        signal("TERM", &[master]);
        if !wait_child(&mut nginx, SHUTDOWN_TIMEOUT) {
            signal("KILL", &[master]);
            let _ = nginx.wait();
        }
        reap_strays(&workers);
    }

    fn stop_fcgiwrap(&mut self) {
        let Some(mut fcgiwrap) = self.fcgiwrap.take() else {
            return;
        };
        let parent = fcgiwrap.id();
        // fcgiwrap's parent neither forwards signals nor stops its children
        // when it dies (and re-forks any that die while it lives), so the
        // parent goes first and the rest of the tree, including any
        // in-flight git processes, is signalled by pid.
        let tree = procs::descendants(&[parent]);
        let mut all = vec![parent];
        all.extend(&tree);
        signal("TERM", &all);
        if !wait_child(&mut fcgiwrap, SHUTDOWN_TIMEOUT) {
            signal("KILL", &[parent]);
            let _ = fcgiwrap.wait();
        }
        reap_strays(&tree);
    }

    fn repo_path(&self, name: &str) -> Result<PathBuf> {
        let valid = !name.is_empty()
            && !name.starts_with('/')
            && name
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !valid {
            bail!("invalid repository name {name:?}");
        }
        Ok(self.repos.join(format!("{name}.git")))
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Some(child) = self.fcgiwrap.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "fcgiwrap exited ({status}): {}",
                        tail(&self.work.join("fcgiwrap.log"))
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("fcgiwrap socket {} never appeared", self.socket.display());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_http(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if http_answers(self.port) {
                return Ok(());
            }
            if let Some(child) = self.nginx.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "nginx exited ({status}): {} {}",
                        tail(&self.work.join("nginx.stderr")),
                        tail(&self.work.join("nginx-error.log"))
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("nginx never answered on 127.0.0.1:{}", self.port);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the meter appends one line of CPU seconds per request.
pub const METER_LOG: &str = "meter.log";

fn nginx_conf(
    b: &Baseline,
    port: u16,
    cores: usize,
    backend: &Path,
    path_env: &str,
    workers: u32,
    meter: Option<&Path>,
) -> String {
    let w = b.work.display();
    let tmp = b.work.join("nginx-tmp");
    let t = tmp.display();
    // nginx refuses `user` unless the master runs as root; as root the
    // workers would otherwise drop to nobody and lose the socket and repos.
    let user = if is_root() { "user root;\n" } else { "" };
    // Room for every concurrent client twice over (client side plus the
    // FastCGI connection), well above the fcgiwrap worker count.
    let connections = (workers as usize * 4).max(1024);
    let params = format!(
        r#"            fastcgi_param GIT_PROJECT_ROOT "{repos}";
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            # Protocol v2 is negotiated through this header.
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param REMOTE_USER $remote_user;
            # fcgiwrap hands the CGI only these parameters as its
            # environment, nothing of its own.
            fastcgi_param PATH "{path_env}";
            fastcgi_param HOME "{w}";
            fastcgi_param GIT_CONFIG_COUNT 1;
            fastcgi_param GIT_CONFIG_KEY_0 safe.directory;
            fastcgi_param GIT_CONFIG_VALUE_0 "*";
"#,
        w = w,
        path_env = path_env,
        repos = b.repos.display(),
    );
    let head = r#"        location ~ ^/.+\.git/(info/refs|git-upload-pack|git-receive-pack)$ {
            fastcgi_pass "unix:{sock}";
            # Stream packs both ways instead of spooling them to disk.
            fastcgi_buffering off;
            fastcgi_request_buffering off;
            # Large repositories can spend minutes counting objects before
            # the first byte of a pack.
            fastcgi_read_timeout 3600s;
            fastcgi_send_timeout 3600s;
            client_body_timeout 3600s;
            send_timeout 3600s;

"#
    .replace("{sock}", &b.socket.display().to_string());
    let main = format!(
        "{head}            fastcgi_param SCRIPT_FILENAME \"{backend}\";\n            fastcgi_param PATH_INFO $uri;\n{params}        }}\n",
        backend = backend.display(),
    );
    // Before the main route, whose pattern matches its paths too: nginx
    // takes the first regex location that matches.
    let metered = match meter {
        None => String::new(),
        Some(m) => format!(
            "{head}            fastcgi_param SCRIPT_FILENAME \"{m}\";\n            fastcgi_param PATH_INFO $1;\n            fastcgi_param CAIRN_BENCH_METER_LOG \"{log}\";\n            fastcgi_param CAIRN_BENCH_METER_EXEC \"{backend}\";\n{params}        }}\n",
            head = head.replace(
                "location ~ ^/.+\\.git/(info/refs|git-upload-pack|git-receive-pack)$",
                "location ~ ^/metered(/.+\\.git/(info/refs|git-upload-pack|git-receive-pack))$"
            ),
            m = m.display(),
            log = b.work.join(METER_LOG).display(),
            backend = backend.display(),
        ),
    };
    format!(
        r#"# Generated by cairn-bench; regenerated on every start.
{user}worker_processes {cores};
master_process on;
pid "{w}/nginx.pid";
error_log "{w}/nginx-error.log" warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path "{t}/client_body";
    fastcgi_temp_path "{t}/fastcgi";
    proxy_temp_path "{t}/proxy";
    uwsgi_temp_path "{t}/uwsgi";
    scgi_temp_path "{t}/scgi";
    tcp_nodelay on;
    keepalive_timeout 65;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        client_max_body_size 0;

{metered}{main}
        location / {{
            return 404;
        }}
    }}
}}
"#,
        nofile = connections * 2 + 64,
    )
}

/// Paths go into the nginx config inside double quotes, where `"`, `\` and
/// `$` would change the meaning.
fn check_conf_safe(p: &Path) -> Result<()> {
    let s = p
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))?;
    if s.contains(['"', '\\', '$', '\n', ';']) {
        bail!("path unsuitable for an nginx config: {s}");
    }
    Ok(())
}

fn enable_push(repo: &Path) -> Result<()> {
    // With no authentication REMOTE_USER is empty, and http-backend only
    // enables receive-pack by default for authenticated users.
    git(Some(repo), ["config", "http.receivepack", "true"])
}

fn count_packs(repo: &Path) -> Result<usize> {
    let dir = repo.join("objects/pack");
    let mut n = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        if entry?.path().extension().is_some_and(|e| e == "pack") {
            n += 1;
        }
    }
    Ok(n)
}

fn git<I, S>(dir: Option<&Path>, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    let out = cmd
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {:?} failed ({}): {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn http_backend_path(git_bin: &Path) -> Result<PathBuf> {
    let out = Command::new(git_bin)
        .arg("--exec-path")
        .output()
        .context("running git --exec-path")?;
    if !out.status.success() {
        bail!("git --exec-path failed: {}", out.status);
    }
    let exec = String::from_utf8(out.stdout).context("git --exec-path output")?;
    let backend = Path::new(exec.trim()).join("git-http-backend");
    if !backend.is_file() {
        bail!("{} not found", backend.display());
    }
    check_conf_safe(&backend)?;
    Ok(backend)
}

/// PATH for the CGI: the directory of the git we run ourselves first, so
/// the server's git matches the client's.
fn cgi_path(git_bin: &Path) -> String {
    let mut dirs: Vec<String> = Vec::new();
    if let Some(d) = git_bin.parent().and_then(Path::to_str) {
        dirs.push(d.to_owned());
    }
    for d in ["/usr/local/bin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_owned());
        }
    }
    dirs.retain(|d| check_conf_safe(Path::new(d)).is_ok() && !d.contains(':'));
    dirs.join(":")
}

/// Looks `name` up on PATH, then in the sbin directories a non-root PATH
/// often lacks (where Debian puts nginx and fcgiwrap).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn http_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).is_ok() && &buf == b"HTTP/"
}

/// (ppid, state) of a live process, from /proc/<pid>/stat.
/// Sends `sig` through kill(1): the workspace forbids the unsafe libc call,
/// and these processes are not all our children.
fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() > deadline => return false,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits for processes that were not our children to go, killing them if
/// they linger.
fn reap_strays(pids: &[u32]) {
    let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| procs::alive(p)).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            signal("KILL", &left);
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Orphans dead before their parent are zombies until init reaps them,
    // which can take a moment; waiting keeps a following process listing
    // clean. Init's pace is not ours, so this gives up quietly.
    let deadline = Instant::now() + ZOMBIE_GRACE;
    while pids.iter().any(|&p| procs::stat(p).is_some()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join(" | ")
}
