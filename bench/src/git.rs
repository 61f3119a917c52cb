//! Running the real `git` client with a deadline, timed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A git command in `dir`, with a clean config so the user's settings do
/// not change what is measured.
pub fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .env("GIT_PROTOCOL_FROM_USER", "1")
        .stdin(Stdio::null());
    cmd
}

/// Runs `git args` in `dir`; fails on a non-zero exit or after `limit`.
pub fn run(dir: &Path, args: &[&str], limit: Duration) -> Result<()> {
    output(dir, args, limit).map(|_| ())
}

/// Like [`run`], returning stdout.
pub fn output(dir: &Path, args: &[&str], limit: Duration) -> Result<String> {
    let mut child = command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting git")?;
    // Drained on threads: a chatty child must not block on a full pipe.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("git {} timed out after {:?}", args.join(" "), limit);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "git {} failed ({status}): {}",
            redact(&args.join(" ")),
            redact(stderr.trim())
        );
    }
    Ok(stdout)
}

/// Seconds `git args` took.
pub fn timed(dir: &Path, args: &[&str], limit: Duration) -> Result<f64> {
    let start = Instant::now();
    run(dir, args, limit)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Hides the token in URLs of error messages.
fn redact(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("http://") {
        out.push_str(&rest[..i + 7]);
        rest = &rest[i + 7..];
        let end = rest.find(['/', ' ']).unwrap_or(rest.len());
        match rest[..end].rfind('@') {
            Some(at) => {
                out.push_str("***@");
                out.push_str(&rest[at + 1..end]);
            }
            None => out.push_str(&rest[..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_redacted() {
        assert_eq!(
            super::redact("push http://u:secret@127.0.0.1:9/a/b.git main"),
            "push http://***@127.0.0.1:9/a/b.git main"
        );
        assert_eq!(super::redact("no url"), "no url");
    }
}
