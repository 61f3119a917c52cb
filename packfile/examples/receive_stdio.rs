//! A receive-pack server over stdin/stdout for tests with the real `git`
//! client: `git push --receive-pack=/path/to/receive_stdio <store> main`.
//!
//! The store is a test-only layout: `<store>/packs/pack-*.{idx,pack}` and a
//! `<store>/refs` text file whose first line is `HEAD <target>` and whose
//! other lines are `<oid> <name>`. Received packs are staged in
//! `<store>/staging` and moved into `packs/` only if a ref update succeeds;
//! the refs file is replaced atomically (temp file + rename).
//!
//! Test hooks (environment):
//! - `RECEIVE_STDIO_RACE="<oid> <name>"` sets that ref right after the
//!   advertisement, simulating a concurrent writer so the client's `old`
//!   values go stale.
//! - Push options are written one per line to `<store>/last-push-options`.
//! - `RECEIVE_STDIO_UPLOAD=1` serves upload-pack from the same store
//!   instead (v2 when `GIT_PROTOCOL` asks for it, else v0), so tests can
//!   clone and `ls-remote` what was pushed:
//!   `git clone --no-local --upload-pack=/path/to/receive_stdio <store> dest`.
//!
//! Tests may seed refs that the push path would refuse (e.g. names longer
//! than the length cap, stored before it existed) by writing the `refs`
//! file directly.

use std::fs;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cairn_packfile::pktline::PktReader;
use cairn_packfile::receive::{
    advertise, ingest, plan_updates, read_request, write_progress, write_report, Limits,
};
use cairn_packfile::refs::{RefRecord, RepoRefs};
use cairn_packfile::store::PackSet;
use cairn_packfile::upload::{advertise_v0, advertise_v2, serve_v0, serve_v2, UploadContext};
use cairn_packfile::ObjectId;

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let Some(store) = std::env::args_os().last().map(PathBuf::from) else {
        eprintln!("usage: receive_stdio <store-dir>");
        return ExitCode::from(2);
    };
    match serve(&store) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("receive_stdio: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_refs(store: &Path) -> Result<RepoRefs, BoxError> {
    let text = match fs::read_to_string(store.join("refs")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(RepoRefs::new(Vec::new(), Some("refs/heads/main".into())))
        }
        Err(e) => return Err(e.into()),
    };
    let mut head = None;
    let mut refs = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (a, b) = line.split_once(' ').ok_or("malformed refs line")?;
        if a == "HEAD" {
            head = Some(b.to_owned());
        } else {
            refs.push(RefRecord {
                name: b.to_owned(),
                target: ObjectId::from_hex(a.as_bytes())?,
            });
        }
    }
    Ok(RepoRefs::new(refs, head))
}

fn write_refs(store: &Path, refs: &RepoRefs) -> io::Result<()> {
    let mut text = format!(
        "HEAD {}\n",
        refs.head.as_deref().unwrap_or("refs/heads/main")
    );
    for r in &refs.refs {
        text.push_str(&format!("{} {}\n", r.target, r.name));
    }
    let tmp = store.join("refs.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, store.join("refs"))
}

fn pack_indices(store: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = store.join("packs");
    let mut out = Vec::new();
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "idx") {
                    out.push(p);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

fn serve_upload(store: &Path) -> Result<(), BoxError> {
    let refs = read_refs(store)?;
    let packs = PackSet::open(&pack_indices(store)?)?;
    let ctx = UploadContext {
        refs: &refs,
        packs: &packs,
        agent: "cairn-test/0.1",
    };
    let proto = std::env::var("GIT_PROTOCOL").unwrap_or_default();
    let mut input = io::stdin().lock();
    let mut out = BufWriter::new(io::stdout().lock());
    if proto.split(':').any(|p| p == "version=2") {
        advertise_v2(&ctx, &mut out)?;
        serve_v2(&ctx, &mut input, &mut out, false)?;
    } else {
        advertise_v0(&ctx, proto.split(':').any(|p| p == "version=1"), &mut out)?;
        serve_v0(&ctx, &mut input, &mut out, false)?;
    }
    out.flush()?;
    Ok(())
}

fn serve(store: &Path) -> Result<(), BoxError> {
    if std::env::var_os("RECEIVE_STDIO_UPLOAD").is_some() {
        return serve_upload(store);
    }
    let limits = Limits::default();
    let mut refs = read_refs(store)?;
    let repo = PackSet::open(&pack_indices(store)?)?;
    let mut out = BufWriter::new(io::stdout().lock());
    advertise(&refs, "cairn-test/0.1", &mut out)?;
    out.flush()?;

    if let Ok(race) = std::env::var("RECEIVE_STDIO_RACE") {
        let (id, name) = race.split_once(' ').ok_or("bad RECEIVE_STDIO_RACE")?;
        let target = ObjectId::from_hex(id.as_bytes())?;
        let mut list: Vec<RefRecord> = refs.refs.into_iter().filter(|r| r.name != name).collect();
        list.push(RefRecord {
            name: name.to_owned(),
            target,
        });
        refs = RepoRefs::new(list, refs.head);
        write_refs(store, &refs)?;
    }

    let mut input = PktReader::new(BufReader::new(io::stdin().lock()));
    let request = match read_request(&mut input, &limits) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !request.push_options.is_empty() {
        let mut text = request.push_options.join("\n");
        text.push('\n');
        fs::write(store.join("last-push-options"), text)?;
    }

    let staging = store.join("staging");
    fs::create_dir_all(&staging)?;
    let ingested = ingest(&request, input.inner_mut(), &repo, &staging, &limits);
    let names: Vec<String> = request.commands.iter().map(|c| c.name.clone()).collect();
    let ingested = match ingested {
        Ok(i) => i,
        Err(e) => {
            let reason = e.unpack_reason();
            let results: Vec<_> = names
                .into_iter()
                .map(|n| (n, Err(e.ref_reason())))
                .collect();
            write_report(&mut out, &request.caps, Err(&reason), &results)?;
            out.flush()?;
            return Ok(());
        }
    };

    let plan = plan_updates(
        &refs,
        &request.commands,
        request.caps.atomic,
        &ingested.command_errors,
    );
    let accepted = plan.iter().any(Result::is_ok);
    if let Some(pack) = ingested.pack {
        if accepted {
            let dir = store.join("packs");
            fs::create_dir_all(&dir)?;
            let file = |p: &Path| p.file_name().map(|n| dir.join(n)).ok_or("bad staged path");
            // The pack first, the index last: a pack is only used once its
            // index is in place.
            fs::rename(&pack.pack_path, file(&pack.pack_path)?)?;
            fs::rename(&pack.index_path, file(&pack.index_path)?)?;
            fs::File::open(&dir)?.sync_all()?;
            write_progress(
                &mut out,
                &request.caps,
                &format!("cairn: stored {} objects\n", pack.objects),
            )?;
        } else {
            pack.discard()?;
        }
    }
    if accepted {
        let mut list = refs.refs.clone();
        for (cmd, result) in request.commands.iter().zip(&plan) {
            if result.is_err() {
                continue;
            }
            list.retain(|r| r.name != cmd.name);
            if !cmd.new.is_null() {
                list.push(RefRecord {
                    name: cmd.name.clone(),
                    target: cmd.new,
                });
            }
        }
        write_refs(store, &RepoRefs::new(list, refs.head.clone()))?;
    }
    let results: Vec<_> = names.into_iter().zip(plan).collect();
    write_report(&mut out, &request.caps, Ok(()), &results)?;
    out.flush()?;
    Ok(())
}
