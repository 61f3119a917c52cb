//! Generates (or describes) a benchmark repository and prints it as JSON.
//!
//! ```text
//! repogen small|medium|large|refs-N CACHE_DIR
//! repogen describe PATH
//! repogen add CLONE BRANCH N SEED
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_bench::repogen::{self, Size};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let generated = match args.as_slice() {
        ["small", cache] => repogen::ensure(Size::Small, Path::new(cache))?,
        ["medium", cache] => repogen::ensure(Size::Medium, Path::new(cache))?,
        ["large", cache] => repogen::ensure(Size::Large, Path::new(cache))?,
        [refs, cache] if refs.starts_with("refs-") => {
            let n = refs["refs-".len()..].parse().context("refs count")?;
            repogen::ensure_refs(n, Path::new(cache))?
        }
        ["describe", path] => repogen::describe("repo", Path::new(path))?,
        ["add", clone, branch, n, seed] => {
            let started = Instant::now();
            let tip = repogen::add_commits(
                Path::new(clone),
                branch,
                n.parse().context("commit count")?,
                seed.parse().context("seed")?,
            )?;
            println!("{tip} ({:.1} ms)", started.elapsed().as_secs_f64() * 1e3);
            return Ok(());
        }
        _ => bail!("usage: repogen small|medium|large|refs-N CACHE_DIR | describe PATH | add CLONE BRANCH N SEED"),
    };
    println!("{}", serde_json::to_string_pretty(&generated)?);
    Ok(())
}
