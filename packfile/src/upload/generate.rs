//! Pack generation with entry reuse.
//!
//! Output objects are ordered by where they are stored (pack, offset), so a
//! full clone of a single-pack repository is essentially a byte copy of its
//! entries. A stored delta is reused when its base is sent too (as
//! OFS_DELTA if the base was already written, else REF_DELTA) or, for thin
//! packs, when the client is known to have the base (REF_DELTA). Everything
//! else is sent whole, except that an object with a client-side version at
//! the same path is offered a freshly computed delta against it. The pack is
//! streamed; only per-object bookkeeping is kept in memory.

use std::collections::HashMap;
use std::io::{self, Write};

use gix_hash::ObjectId;
use gix_object::Kind;
use gix_pack::data::entry::Header;

use super::delta;
use super::walk::ObjectPlan;
use super::UploadError;
use crate::store::{EntryLocation, PackSet, StoreError};

/// Capabilities of the receiving client that shape the pack.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackOptions {
    /// The client understands OFS_DELTA entries.
    pub ofs_delta: bool,
    /// Deltas may use bases the client has but which are not in the pack.
    pub thin: bool,
    /// The client may lack blobs of its own history (partial clone).
    pub client_lacks_blobs: bool,
    /// The client may lack trees of its own history (partial clone).
    pub client_lacks_trees: bool,
}

/// What the writer did, for progress output and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    pub objects: u32,
    /// Entries copied from storage (whole objects and deltas).
    pub reused: u32,
    /// Of those, deltas.
    pub reused_deltas: u32,
    /// Deltas computed here against a client-side base.
    pub new_deltas: u32,
    /// Objects decompressed and recompressed whole.
    pub recompressed: u32,
    /// Total pack size including header and trailer.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Another object of this pack (index into the item list).
    Output(usize),
    /// An object the client has.
    Client(ObjectId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rep {
    /// Stored whole: copy the entry as is.
    Copy,
    /// Stored as a delta whose base the client will have.
    Delta(Base),
    /// Must be decoded and written whole (or re-deltified).
    Whole,
}

struct Item {
    id: ObjectId,
    kind: Kind,
    path_hash: u64,
    loc: EntryLocation,
    /// Index position, for the CRC check.
    idx_pos: u32,
    /// Stored header and where its compressed data lies.
    header: Header,
    decompressed_size: u64,
    data_offset: u64,
    end: u64,
    rep: Rep,
}

fn corrupt(id: ObjectId, e: impl std::fmt::Display) -> UploadError {
    UploadError::Corrupt {
        id,
        message: e.to_string(),
    }
}

/// Counts and hashes everything written through it.
struct HashWriter<W> {
    inner: W,
    hasher: gix_hash::Hasher,
    written: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn deflate(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Writes a pack with the objects of `plan` to `out`.
pub fn write_pack(
    packs: &PackSet,
    plan: &ObjectPlan,
    opts: &PackOptions,
    out: &mut impl Write,
) -> Result<PackStats, UploadError> {
    let bundles = packs.bundles();
    let position: HashMap<ObjectId, usize> = plan
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| (o.id, i))
        .collect();
    let client_base_ok = |id: &ObjectId| -> bool {
        opts.thin
            && match plan.client_has.get(id) {
                Some(Kind::Blob) => !opts.client_lacks_blobs,
                Some(Kind::Tree) => !opts.client_lacks_trees,
                Some(_) => true,
                None => false,
            }
    };

    let mut items = Vec::with_capacity(plan.objects.len());
    for o in &plan.objects {
        let loc = packs
            .locate(&o.id)
            .ok_or(StoreError::Missing { id: o.id })?;
        let bundle = &bundles[loc.pack];
        let rev = packs.rev_index(loc.pack);
        let pos = rev
            .find(loc.offset)
            .ok_or_else(|| corrupt(o.id, "offset not in index"))?;
        let entry = bundle
            .pack
            .entry(loc.offset)
            .map_err(|e| corrupt(o.id, e))?;
        let base_id = match entry.header {
            Header::OfsDelta { base_distance } => {
                let base_off = entry
                    .checked_base_pack_offset(base_distance)
                    .ok_or_else(|| corrupt(o.id, "ofs-delta base before pack start"))?;
                let base_pos = rev
                    .find(base_off)
                    .ok_or_else(|| corrupt(o.id, "ofs-delta base is not an entry"))?;
                Some(
                    bundle
                        .index
                        .oid_at_index(rev.entries[base_pos].1)
                        .to_owned(),
                )
            }
            Header::RefDelta { base_id } => Some(base_id),
            _ => None,
        };
        let rep = match base_id {
            None => Rep::Copy,
            Some(b) => match position.get(&b) {
                Some(&i) => Rep::Delta(Base::Output(i)),
                None if client_base_ok(&b) => Rep::Delta(Base::Client(b)),
                None => Rep::Whole,
            },
        };
        items.push(Item {
            id: o.id,
            kind: o.kind,
            path_hash: o.path_hash,
            loc,
            idx_pos: rev.entries[pos].1,
            header: entry.header,
            decompressed_size: entry.decompressed_size,
            data_offset: entry.data_offset,
            end: rev.end(pos),
            rep,
        });
    }
    break_delta_cycles(&mut items);

    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].loc);

    let mut w = HashWriter {
        inner: out,
        hasher: gix_hash::hasher(gix_hash::Kind::Sha1),
        written: 0,
    };
    let count = u32::try_from(items.len())
        .map_err(|_| UploadError::protocol("too many objects for one pack"))?;
    w.write_all(b"PACK")?;
    w.write_all(&2u32.to_be_bytes())?;
    w.write_all(&count.to_be_bytes())?;

    let mut stats = PackStats {
        objects: count,
        ..PackStats::default()
    };
    let mut written_at: Vec<Option<u64>> = vec![None; items.len()];
    let reader = packs.reader();
    let mut buf = Vec::new();
    let mut base_buf = Vec::new();
    for &i in &order {
        let offset = w.written;
        let it = &items[i];
        let bundle = &bundles[it.loc.pack];
        let entry_bytes = || -> Result<&[u8], UploadError> {
            let raw = bundle
                .pack
                .entry_slice(it.loc.offset..it.end)
                .ok_or_else(|| corrupt(it.id, "entry outside pack data"))?;
            if let Some(crc) = bundle.index.crc32_at_index(it.idx_pos) {
                if bundle.pack.entry_crc32(it.loc.offset, raw.len()) != crc {
                    return Err(corrupt(it.id, "stored entry fails its CRC check"));
                }
            }
            Ok(raw)
        };
        let header_len = (it.data_offset - it.loc.offset) as usize;

        // An object the client has an older version of gets a new delta.
        let client_base = (opts.thin
            && it.path_hash != 0
            && matches!(it.rep, Rep::Copy | Rep::Whole))
        .then(|| plan.client_by_path.get(&it.path_hash).copied())
        .flatten()
        .filter(|b| *b != it.id && client_base_ok(b) && plan.client_has.get(b) == Some(&it.kind));
        if let Some(base) = client_base {
            let (_, target) = reader.get(&it.id, &mut buf)?;
            let (_, base_data) = reader.get(&base, &mut base_buf)?;
            let limit = (target.len() / 2).saturating_sub(20);
            if let Some(d) = delta::encode(base_data, target, limit) {
                let packed = deflate(&d)?;
                Header::RefDelta { base_id: base }.write_to(d.len() as u64, &mut w)?;
                w.write_all(&packed)?;
                stats.new_deltas += 1;
                written_at[i] = Some(offset);
                continue;
            }
        }

        match it.rep {
            Rep::Copy => {
                w.write_all(entry_bytes()?)?;
                stats.reused += 1;
            }
            Rep::Delta(base) => {
                let data = &entry_bytes()?[header_len..];
                let header = match base {
                    Base::Output(b) => match written_at[b] {
                        Some(base_off) if opts.ofs_delta => Header::OfsDelta {
                            base_distance: offset - base_off,
                        },
                        _ => Header::RefDelta {
                            base_id: items[b].id,
                        },
                    },
                    Base::Client(id) => Header::RefDelta { base_id: id },
                };
                if header == it.header {
                    // Unchanged header: keep the stored bytes exactly.
                    w.write_all(entry_bytes()?)?;
                } else {
                    header.write_to(it.decompressed_size, &mut w)?;
                    w.write_all(data)?;
                }
                stats.reused += 1;
                stats.reused_deltas += 1;
            }
            Rep::Whole => {
                let (kind, data) = reader.get(&it.id, &mut buf)?;
                let header = match kind {
                    Kind::Commit => Header::Commit,
                    Kind::Tree => Header::Tree,
                    Kind::Blob => Header::Blob,
                    Kind::Tag => Header::Tag,
                };
                header.write_to(data.len() as u64, &mut w)?;
                w.write_all(&deflate(data)?)?;
                stats.recompressed += 1;
            }
        }
        written_at[i] = Some(offset);
    }

    let HashWriter {
        inner,
        hasher,
        written,
    } = w;
    let trailer = hasher
        .try_finalize()
        .map_err(|e| io::Error::other(e.to_string()))?;
    inner.write_all(trailer.as_slice())?;
    stats.bytes = written + trailer.as_slice().len() as u64;
    Ok(stats)
}

/// Reused deltas between sent objects form a graph with at most one base
/// per object; when the same object is stored in several packs the chosen
/// copies could refer to each other in a loop, which no client can resolve.
/// Such loops are broken by sending one member whole.
fn break_delta_cycles(items: &mut [Item]) {
    const NEW: u8 = 0;
    const ACTIVE: u8 = 1;
    const FINISHED: u8 = 2;
    let mut state = vec![NEW; items.len()];
    for start in 0..items.len() {
        let mut path = Vec::new();
        let mut cur = start;
        loop {
            match state[cur] {
                FINISHED => break,
                ACTIVE => {
                    // `cur` closes a loop: send it whole.
                    items[cur].rep = Rep::Whole;
                    break;
                }
                _ => {}
            }
            state[cur] = ACTIVE;
            path.push(cur);
            match items[cur].rep {
                Rep::Delta(Base::Output(b)) => cur = b,
                _ => break,
            }
        }
        for p in path {
            state[p] = FINISHED;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    use super::*;
    use crate::store::RevIndex;
    use crate::upload::walk::PlannedObject;

    fn git(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "C")
            .env("GIT_COMMITTER_EMAIL", "c@example.com")
            .env("GIT_AUTHOR_DATE", "@1577836800 +0000")
            .env("GIT_COMMITTER_DATE", "@1577836800 +0000")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn git");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || io::Write::write_all(&mut input, &data));
        let out = child.wait_with_output().expect("git runs");
        let _ = feeder.join();
        out
    }

    fn ok(out: Output) -> String {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A repository whose single pack holds blob deltas; returns its
    /// directory, the pack path and the opened set.
    fn fixture(dir: &Path) -> (PathBuf, PackSet) {
        let repo = dir.join("repo");
        ok(git(dir, &["init", "-q", "repo"], b""));
        let mut text = String::new();
        for i in 0..12 {
            for l in 0..200 {
                text.push_str(&format!(
                    "line {l} of revision {}\n",
                    if l == i * 3 { i } else { 0 }
                ));
            }
            std::fs::write(repo.join("file.txt"), &text).expect("write");
            text.clear();
            ok(git(&repo, &["add", "."], b""));
            ok(git(&repo, &["commit", "-q", "-m", &format!("c{i}")], b""));
        }
        ok(git(&repo, &["repack", "-a", "-d", "-q"], b""));
        let pack_dir = repo.join(".git/objects/pack");
        let idx = std::fs::read_dir(&pack_dir)
            .expect("pack dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))
            .expect("one pack");
        let packs = PackSet::open(&[&idx]).expect("open");
        (idx.with_extension("pack"), packs)
    }

    fn all_objects(packs: &PackSet) -> Vec<PlannedObject> {
        let reader = packs.reader();
        let b = &packs.bundles()[0];
        (0..b.index.num_objects())
            .map(|i| {
                let id = b.index.oid_at_index(i).to_owned();
                let kind = reader.kind(&id).expect("decodes").expect("present");
                PlannedObject {
                    id,
                    kind,
                    path_hash: 0,
                }
            })
            .collect()
    }

    /// The first blob stored as a delta, and its base.
    fn delta_blob(packs: &PackSet) -> (ObjectId, ObjectId) {
        let b = &packs.bundles()[0];
        let rev = RevIndex::build(b);
        for i in 0..b.index.num_objects() {
            let e = b
                .pack
                .entry(b.index.pack_offset_at_index(i))
                .expect("entry");
            if let Header::OfsDelta { base_distance } = e.header {
                let base_off = e.pack_offset() - base_distance;
                let pos = rev.find(base_off).expect("base entry");
                let base = b.index.oid_at_index(rev.entries[pos].1).to_owned();
                return (b.index.oid_at_index(i).to_owned(), base);
            }
        }
        panic!("fixture has no deltas");
    }

    fn index_pack(dir: &Path, pack: &[u8], fix_thin: bool) -> Output {
        let args: &[&str] = if fix_thin {
            &["index-pack", "--stdin", "--fix-thin"]
        } else {
            &["index-pack", "--stdin"]
        };
        git(dir, args, pack)
    }

    fn write(packs: &PackSet, plan: &ObjectPlan, opts: PackOptions) -> (Vec<u8>, PackStats) {
        let mut out = Vec::new();
        let stats = write_pack(packs, plan, &opts, &mut out).expect("pack written");
        assert_eq!(stats.bytes, out.len() as u64);
        (out, stats)
    }

    #[test]
    fn full_set_is_a_byte_copy_of_the_stored_pack() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (pack_path, packs) = fixture(tmp.path());
        let mut objects = all_objects(&packs);
        objects.reverse(); // input order must not matter
        let plan = ObjectPlan {
            objects,
            ..ObjectPlan::default()
        };
        let opts = PackOptions {
            ofs_delta: true,
            ..PackOptions::default()
        };
        let (out, stats) = write(&packs, &plan, opts);
        assert_eq!(out, std::fs::read(pack_path).expect("stored pack"));
        assert_eq!(stats.recompressed, 0);
        assert!(stats.reused_deltas > 0);
    }

    #[test]
    fn without_ofs_delta_every_delta_is_a_ref_delta() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_, packs) = fixture(tmp.path());
        let plan = ObjectPlan {
            objects: all_objects(&packs),
            ..ObjectPlan::default()
        };
        let (out, stats) = write(&packs, &plan, PackOptions::default());
        assert!(stats.reused_deltas > 0);
        let mut offset = 12u64;
        for _ in 0..stats.objects {
            let e = gix_pack::data::Entry::from_bytes(
                &out[offset as usize..],
                offset,
                gix_hash::Kind::Sha1,
            )
            .expect("entry");
            assert!(!matches!(e.header, Header::OfsDelta { .. }));
            // Skip the zlib stream to find the next entry.
            let mut inflate = flate2::Decompress::new(true);
            let mut sink = vec![0u8; e.decompressed_size as usize + 1];
            inflate
                .decompress(
                    &out[e.data_offset as usize..],
                    &mut sink,
                    flate2::FlushDecompress::Finish,
                )
                .expect("inflate");
            offset = e.data_offset + inflate.total_in();
        }
        let bare = tmp.path().join("check.git");
        ok(git(tmp.path(), &["init", "-q", "--bare", "check.git"], b""));
        ok(index_pack(&bare, &out, false));
    }

    #[test]
    fn delta_without_available_base_is_sent_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_, packs) = fixture(tmp.path());
        let (delta, _) = delta_blob(&packs);
        let plan = ObjectPlan {
            objects: vec![PlannedObject {
                id: delta,
                kind: Kind::Blob,
                path_hash: 0,
            }],
            ..ObjectPlan::default()
        };
        // Thin packs are allowed, but the client is not known to have the base.
        let opts = PackOptions {
            ofs_delta: true,
            thin: true,
            ..PackOptions::default()
        };
        let (out, stats) = write(&packs, &plan, opts);
        assert_eq!((stats.recompressed, stats.reused_deltas), (1, 0));
        ok(git(tmp.path(), &["init", "-q", "--bare", "empty.git"], b""));
        let listed = ok(index_pack(&tmp.path().join("empty.git"), &out, false));
        assert!(!listed.is_empty());
    }

    #[test]
    fn thin_pack_reuses_delta_against_client_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_, packs) = fixture(tmp.path());
        let (delta, base) = delta_blob(&packs);
        let mut plan = ObjectPlan {
            objects: vec![PlannedObject {
                id: delta,
                kind: Kind::Blob,
                path_hash: 0,
            }],
            ..ObjectPlan::default()
        };
        plan.client_has.insert(base, Kind::Blob);
        let thin = PackOptions {
            ofs_delta: true,
            thin: true,
            ..PackOptions::default()
        };
        let (out, stats) = write(&packs, &plan, thin);
        assert_eq!(stats.reused_deltas, 1);
        let e =
            gix_pack::data::Entry::from_bytes(&out[12..], 12, gix_hash::Kind::Sha1).expect("entry");
        assert_eq!(e.header, Header::RefDelta { base_id: base });
        // The source repository has the base, so it can complete the pack.
        ok(index_pack(&tmp.path().join("repo"), &out, true));

        // A partial-clone client may lack blobs: no blob bases then.
        let lacking = PackOptions {
            client_lacks_blobs: true,
            ..thin
        };
        let (_, stats) = write(&packs, &plan, lacking);
        assert_eq!((stats.reused_deltas, stats.recompressed), (0, 1));
    }

    #[test]
    fn new_delta_against_client_version_at_same_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_, packs) = fixture(tmp.path());
        let repo = tmp.path().join("repo");
        let newest =
            ObjectId::from_hex(ok(git(&repo, &["rev-parse", "HEAD:file.txt"], b"")).as_bytes())
                .expect("hex");
        let older =
            ObjectId::from_hex(ok(git(&repo, &["rev-parse", "HEAD~1:file.txt"], b"")).as_bytes())
                .expect("hex");
        let mut plan = ObjectPlan {
            objects: vec![PlannedObject {
                id: newest,
                kind: Kind::Blob,
                path_hash: 42,
            }],
            ..ObjectPlan::default()
        };
        plan.client_has.insert(older, Kind::Blob);
        plan.client_by_path.insert(42, older);
        let opts = PackOptions {
            ofs_delta: true,
            thin: true,
            ..PackOptions::default()
        };
        let (out, stats) = write(&packs, &plan, opts);
        assert_eq!(stats.new_deltas, 1);
        assert!(out.len() < 200, "delta pack is {} bytes", out.len());
        ok(index_pack(&repo, &out, true));
    }

    #[test]
    fn delta_cycles_are_broken() {
        let id = |n: u8| ObjectId::from_bytes_or_panic(&[n; 20]);
        let item = |n: u8, rep: Rep| Item {
            id: id(n),
            kind: Kind::Blob,
            path_hash: 0,
            loc: EntryLocation {
                pack: n as usize,
                offset: 12,
            },
            idx_pos: 0,
            header: Header::Blob,
            decompressed_size: 0,
            data_offset: 13,
            end: 14,
            rep,
        };
        // 0 -> 1 -> 2 -> 0 is a loop; 3 -> 0 hangs off it; 4 is independent.
        let mut items = vec![
            item(0, Rep::Delta(Base::Output(1))),
            item(1, Rep::Delta(Base::Output(2))),
            item(2, Rep::Delta(Base::Output(0))),
            item(3, Rep::Delta(Base::Output(0))),
            item(4, Rep::Delta(Base::Client(id(9)))),
        ];
        break_delta_cycles(&mut items);
        let whole = items.iter().filter(|i| i.rep == Rep::Whole).count();
        assert_eq!(whole, 1);
        assert_eq!(items[3].rep, Rep::Delta(Base::Output(0)));
        assert_eq!(items[4].rep, Rep::Delta(Base::Client(id(9))));
    }
}
