//! Wire-level helpers: a byte-counting TCP proxy (bytes on the wire of a
//! fetch) and a minimal smart-HTTP client speaking upload-pack v2, which
//! asks for everything and discards the pack, so the server's pack
//! throughput is measured without the client's own index-pack.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Forwards every connection to `upstream`, counting bytes each way.
pub struct CountingProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    pub fn start(upstream: SocketAddr) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let (down, up, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, u, s) = (down.clone(), up.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let (d, u) = (d.clone(), u.clone());
                std::thread::spawn(move || pipe(client, server, &u));
                std::thread::spawn(move || pipe(s2, c2, &d));
            }
        });
        Ok(CountingProxy {
            addr,
            down,
            up,
            stop,
        })
    }

    /// (server → client, client → server) bytes since the last reset.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.down.load(Ordering::Relaxed),
            self.up.load(Ordering::Relaxed),
        )
    }

    pub fn reset(&self) {
        self.down.store(0, Ordering::Relaxed);
        self.up.store(0, Ordering::Relaxed);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A parsed `http://[user:pass@]host:port/path` URL.
#[derive(Debug, Clone)]
pub struct Url {
    pub addr: SocketAddr,
    pub path: String,
    pub auth: Option<String>,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (auth, host) = match authority.rfind('@') {
            Some(i) => (
                Some(base64(&authority.as_bytes()[..i])),
                &authority[i + 1..],
            ),
            None => (None, authority),
        };
        Ok(Url {
            addr: host.parse().with_context(|| format!("host of {url}"))?,
            path: path.trim_end_matches('/').to_owned(),
            auth,
        })
    }

    /// The same URL with its host:port replaced (to go through a proxy).
    pub fn via(url: &str, proxy: SocketAddr) -> Result<String> {
        let u = Url::parse(url)?;
        Ok(url.replacen(&u.addr.to_string(), &proxy.to_string(), 1))
    }
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An HTTP/1.1 response whose body is read as a stream.
pub struct Response {
    pub status: u16,
    pub body: Box<dyn Read>,
}

impl Response {
    pub fn text(mut self) -> Result<String> {
        let mut s = String::new();
        self.body.read_to_string(&mut s)?;
        Ok(s)
    }
}

/// One request on its own connection (`Connection: close`).
pub fn request(
    url: &Url,
    method: &str,
    suffix: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let stream =
        TcpStream::connect(url.addr).with_context(|| format!("connecting {}", url.addr))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut head = format!(
        "{method} {}{suffix} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: cairn-bench\r\nContent-Length: {}\r\n",
        url.path,
        url.addr,
        body.len()
    );
    if let Some(auth) = &url.auth {
        head.push_str(&format!("Authorization: Basic {auth}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut w = stream.try_clone()?;
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    let mut r = BufReader::with_capacity(256 * 1024, stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<u64>().ok();
            }
        }
    }
    let body: Box<dyn Read> = if chunked {
        Box::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        })
    } else if let Some(n) = length {
        Box::new(r.take(n))
    } else {
        Box::new(r)
    };
    Ok(Response { status, body })
}

struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line.trim().is_empty() {
                // The CRLF closing the previous chunk.
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let max = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// pkt-line framing.
fn pkt(line: &str) -> String {
    format!("{:04x}{line}", line.len() + 4)
}

/// Reads one pkt-line: None for flush/delim/response-end, else the payload.
fn read_pkt(r: &mut dyn Read, buf: &mut Vec<u8>) -> Result<Option<usize>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .context("reading a pkt-line length")?;
    let n = usize::from_str_radix(std::str::from_utf8(&len)?, 16)
        .map_err(|_| anyhow!("bad pkt-line length {:?}", String::from_utf8_lossy(&len)))?;
    if n < 4 {
        return Ok(None);
    }
    buf.resize(n - 4, 0);
    r.read_exact(buf).context("reading a pkt-line")?;
    Ok(Some(n - 4))
}

/// What one discard-clone measured.
#[derive(Debug, Clone, Copy)]
pub struct PackFetch {
    /// Pack bytes (side-band 1 payload).
    pub pack_bytes: u64,
    /// Objects the pack header announces.
    pub objects: u32,
    /// From the first request to the last byte.
    pub seconds: f64,
}

/// Fetches every ref's object over upload-pack v2 (`ls-refs`, then `fetch`
/// with `done`) as a clone would, reading and discarding the pack.
pub fn discard_clone(repo_url: &str) -> Result<PackFetch> {
    let url = Url::parse(repo_url)?;
    let v2 = ("Git-Protocol", "version=2");
    let start = Instant::now();
    let adv = request(
        &url,
        "GET",
        "/info/refs?service=git-upload-pack",
        &[v2],
        b"",
    )?;
    if adv.status != 200 {
        bail!("info/refs answered {}", adv.status);
    }
    let caps = adv.text()?;
    if !caps.contains("version 2") {
        bail!("the server did not answer with protocol v2");
    }
    let post = |body: &str| {
        request(
            &url,
            "POST",
            "/git-upload-pack",
            &[
                v2,
                ("Content-Type", "application/x-git-upload-pack-request"),
                ("Accept", "application/x-git-upload-pack-result"),
            ],
            body.as_bytes(),
        )
    };
    let ls = format!(
        "{}{}0001{}{}0000",
        pkt("command=ls-refs\n"),
        pkt("agent=cairn-bench\n"),
        pkt("peel\n"),
        pkt("ref-prefix refs/\n"),
    );
    let resp = post(&ls)?;
    if resp.status != 200 {
        bail!("ls-refs answered {}", resp.status);
    }
    let mut body = resp.body;
    let mut buf = Vec::new();
    let mut wants: Vec<String> = Vec::new();
    while read_pkt(&mut body, &mut buf)?.is_some() {
        let line = String::from_utf8_lossy(&buf);
        if let Some(id) = line.split_whitespace().next() {
            if id.len() == 40 && !wants.iter().any(|w| w == id) {
                wants.push(id.to_owned());
            }
        }
    }
    if wants.is_empty() {
        bail!("ls-refs listed no refs");
    }
    let mut fetch = format!(
        "{}{}0001{}{}",
        pkt("command=fetch\n"),
        pkt("agent=cairn-bench\n"),
        pkt("ofs-delta\n"),
        pkt("no-progress\n"),
    );
    for w in &wants {
        fetch.push_str(&pkt(&format!("want {w}\n")));
    }
    fetch.push_str(&pkt("done\n"));
    fetch.push_str("0000");
    let resp = post(&fetch)?;
    if resp.status != 200 {
        bail!("fetch answered {}", resp.status);
    }
    let mut body = resp.body;
    let mut in_pack = false;
    let mut pack_bytes = 0u64;
    let mut header: Vec<u8> = Vec::new();
    loop {
        let Some(n) = read_pkt(&mut body, &mut buf)? else {
            if in_pack {
                break;
            }
            continue;
        };
        if !in_pack {
            if buf.starts_with(b"packfile") {
                in_pack = true;
            }
            continue;
        }
        match buf.first() {
            Some(1) => {
                pack_bytes += (n - 1) as u64;
                if header.len() < 12 {
                    let take = (12 - header.len()).min(n - 1);
                    header.extend_from_slice(&buf[1..1 + take]);
                }
            }
            Some(2) => {}
            Some(3) => bail!("server error: {}", String::from_utf8_lossy(&buf[1..])),
            _ => bail!("unexpected side-band byte"),
        }
    }
    if header.len() < 12 || &header[..4] != b"PACK" {
        bail!("no pack in the answer");
    }
    let objects = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    Ok(PackFetch {
        pack_bytes,
        objects,
        seconds: start.elapsed().as_secs_f64(),
    })
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
        assert_eq!(base64(b"x-token-auth:abc"), "eC10b2tlbi1hdXRoOmFiYw==");
    }

    #[test]
    fn urls_keep_path_and_credentials() {
        let u = Url::parse("http://u:p@127.0.0.1:8080/ws/r.git").expect("url");
        assert_eq!(u.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(u.path, "/ws/r.git");
        assert_eq!(u.auth.as_deref(), Some("dTpw"));
        let via = Url::via(
            "http://u:p@127.0.0.1:8080/ws/r.git",
            "127.0.0.1:9".parse().expect("addr"),
        )
        .expect("via");
        assert_eq!(via, "http://u:p@127.0.0.1:9/ws/r.git");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut c = Chunked {
            inner: BufReader::new(&raw[..]),
            left: 0,
            done: false,
        };
        let mut s = String::new();
        c.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello world");
    }
}
