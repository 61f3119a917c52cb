//! Ingestion of a pushed pack: copy it byte for byte into the staging
//! directory while gix parses it (verifying the trailer), resolve every
//! object to learn its id and fsck it, complete a thin pack by appending
//! the missing delta bases from the repository, write a v2 index, then
//! check that every new ref tip is connected.
//!
//! The indexer is our own rather than `gix_pack::Bundle::write_to_directory`
//! for three reasons: that API (like gix's index writer) takes a `prodash`
//! progress object this crate cannot name without another dependency; its
//! thin-pack completion inserts a base even when the client also sent that
//! object, leaving a pack git rejects for duplicate objects; and resolving
//! objects ourselves lets fsck run on each one as it is decoded, so nothing
//! is inflated twice. gix still does the stream parsing, trailer check and
//! delta application.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gix_hash::ObjectId;
use gix_object::Kind;
use gix_pack::data::decode::entry::ResolvedBase;
use gix_pack::data::entry::Header;
use gix_pack::data::input;

use super::connectivity;
use super::fsck::check_object_marking;
use super::gitmodules;
use super::refname::check_ref_name_length;
use super::{Limits, PushRequest, ReceiveError};
use crate::store::PackSet;

/// A validated pack in the staging directory, named like git names packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedPack {
    /// The pack checksum (its trailer), which names the files.
    pub id: ObjectId,
    pub pack_path: PathBuf,
    pub index_path: PathBuf,
    pub objects: u64,
    /// Size of the `.pack` file.
    pub bytes: u64,
}

impl StagedPack {
    /// Removes both files (e.g. when no ref update was accepted).
    pub fn discard(self) -> io::Result<()> {
        remove_if_exists(&self.index_path)?;
        remove_if_exists(&self.pack_path)
    }
}

/// What [`ingest`] produced.
#[derive(Debug)]
pub struct Ingested {
    /// `None` when no pack was expected or the pack held no objects.
    pub pack: Option<StagedPack>,
    /// Per command (same order as the request): `Some(reason)` if the new
    /// tip is not connected or not acceptable for that ref.
    pub command_errors: Vec<Option<String>>,
}

/// Reads the pack (if the request expects one) from `pack`, stages it in
/// `staging_dir` and validates it. On error nothing is left in staging.
pub fn ingest(
    request: &PushRequest,
    pack: &mut impl BufRead,
    repo: &PackSet,
    staging_dir: &Path,
    limits: &Limits,
) -> Result<Ingested, ReceiveError> {
    let staged = if request.expects_pack() {
        receive_pack(pack, repo, staging_dir, limits)?
    } else {
        None
    };
    let Some(Received {
        staged,
        kinds,
        gitmodules,
        cleanup,
    }) = staged
    else {
        let command_errors = connectivity::check(request, repo, None, &HashMap::new())?;
        return Ok(Ingested {
            pack: None,
            command_errors: with_name_errors(request, command_errors),
        });
    };
    // From here on the files exist; `cleanup` removes them if anything fails.
    let bundle = gix_pack::Bundle::at(&staged.index_path, gix_hash::Kind::Sha1).map_err(|e| {
        ReceiveError::PackCorrupt {
            detail: format!("cannot open staged pack: {}", flatten(&e)),
        }
    })?;
    let new = PackSet::default().with_bundle(Arc::new(bundle));
    // Only now is every object known: a new tree may name a blob sent
    // later in the pack, or one the repository already has.
    gitmodules::check_marked(&gitmodules, &new, repo)?;
    let command_errors = connectivity::check(request, repo, Some(&new), &kinds)?;
    cleanup.disarm();
    Ok(Ingested {
        pack: Some(staged),
        command_errors: with_name_errors(request, command_errors),
    })
}

/// Adds the refusals of over-long names to the per-command errors.
fn with_name_errors(request: &PushRequest, mut errors: Vec<Option<String>>) -> Vec<Option<String>> {
    errors.resize(request.commands.len(), None);
    for (cmd, err) in request.commands.iter().zip(errors.iter_mut()) {
        if err.is_none() {
            *err = check_ref_name_length(cmd);
        }
    }
    errors
}

/// Deletes its paths on drop unless disarmed.
struct Cleanup(Vec<PathBuf>);

impl Cleanup {
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A `BufRead` over the client's stream that refuses to go past `limit`
/// bytes, remembers whether the input ended early (so gix's generic errors
/// can be told apart), and copies every consumed byte to `tee` so the
/// staged pack is exactly what the client sent.
struct Limited<'a, R> {
    inner: &'a mut R,
    consumed: u64,
    limit: u64,
    hit_limit: bool,
    hit_eof: bool,
    tee: Option<BufWriter<File>>,
    tee_error: Option<io::Error>,
}

impl<R: BufRead> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Limited<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.tee_error.is_some() {
            return Err(io::Error::other("writing the staged pack failed"));
        }
        let allowance = self.limit - self.consumed;
        let buf = self.inner.fill_buf()?;
        if buf.is_empty() {
            self.hit_eof = true;
            return Ok(buf);
        }
        if allowance == 0 {
            self.hit_limit = true;
            return Err(io::Error::other("pack size limit exceeded"));
        }
        let n = buf
            .len()
            .min(usize::try_from(allowance).unwrap_or(usize::MAX));
        Ok(&buf[..n])
    }

    fn consume(&mut self, amt: usize) {
        if let Some(tee) = &mut self.tee {
            // The bytes being consumed are still in the inner buffer, so
            // this fill_buf does no I/O.
            let copied = self
                .inner
                .fill_buf()
                .and_then(|buf| tee.write_all(&buf[..amt.min(buf.len())]));
            if let Err(e) = copied {
                self.tee_error.get_or_insert(e);
            }
        }
        self.consumed += amt as u64;
        self.inner.consume(amt);
    }
}

const HEADER_LEN: usize = 12;
const HASH_LEN: usize = 20;

/// A staged pack whose objects are all resolved and fsck-clean.
struct Received {
    staged: StagedPack,
    kinds: HashMap<ObjectId, Kind>,
    /// Blobs received trees name `.gitmodules`, still to be checked.
    gitmodules: BTreeSet<ObjectId>,
    /// Removes the staged files unless disarmed.
    cleanup: Cleanup,
}

/// Fails with [`ReceiveError::PackJunk`] if anything follows the pack and
/// `limits` asks for the end of input there.
fn expect_end<R: BufRead>(
    limited: &mut Limited<'_, R>,
    limits: &Limits,
) -> Result<(), ReceiveError> {
    if !limits.require_eof_after_pack {
        return Ok(());
    }
    // Peek at the client's stream itself: the pack is complete, so neither
    // the size limit nor the copy into staging apply to what follows.
    let rest = limited
        .inner
        .fill_buf()
        .map_err(|e| ReceiveError::io("<client>", e))?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(ReceiveError::PackJunk)
    }
}

fn receive_pack(
    pack: &mut impl BufRead,
    repo: &PackSet,
    staging_dir: &Path,
    limits: &Limits,
) -> Result<Option<Received>, ReceiveError> {
    let mut limited = Limited {
        inner: pack,
        consumed: 0,
        limit: limits.max_pack_bytes,
        hit_limit: false,
        hit_eof: false,
        tee: None,
        tee_error: None,
    };
    let mut header = [0u8; HEADER_LEN];
    read_exact_classified(&mut limited, &mut header, limits, true)?;
    if &header[..4] != b"PACK" {
        return Err(ReceiveError::BadPackHeader {
            reason: "missing PACK signature".into(),
        });
    }
    let (_version, count) =
        gix_pack::data::header::decode(&header).map_err(|e| ReceiveError::BadPackHeader {
            reason: flatten(&e),
        })?;
    if count > limits.max_objects {
        return Err(ReceiveError::TooManyObjects {
            announced: count,
            limit: limits.max_objects,
        });
    }
    if count == 0 {
        // gix's entry iterator yields nothing for an empty pack and never
        // reads its trailer; check it here so the stream is fully consumed.
        let mut trailer = [0u8; HASH_LEN];
        read_exact_classified(&mut limited, &mut trailer, limits, false)?;
        let mut h = gix_hash::hasher(gix_hash::Kind::Sha1);
        h.update(&header);
        let want = h.try_finalize().map_err(|e| ReceiveError::PackCorrupt {
            detail: flatten(&e),
        })?;
        if want.as_slice() != trailer {
            return Err(ReceiveError::PackChecksum);
        }
        expect_end(&mut limited, limits)?;
        return Ok(None);
    }

    let tmp_path = staging_dir.join(format!("tmp_pack_{}", unique_suffix()));
    let io_err = |e| ReceiveError::io(&tmp_path, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(io_err)?;
    let mut cleanup = Cleanup(vec![tmp_path.clone()]);
    let mut out = BufWriter::with_capacity(1 << 16, file);
    out.write_all(&header).map_err(io_err)?;
    limited.tee = Some(out);

    let streamed = stream_entries(&mut limited, header);
    if let Some(e) = limited.tee_error.take() {
        return Err(io_err(e));
    }
    let mut entries = match streamed {
        Ok(e) => e,
        Err(e) => return Err(classify_stream_error(&limited, limits, &e)),
    };
    let file = match limited.tee.take().map(BufWriter::into_inner) {
        Some(Ok(f)) => f,
        Some(Err(e)) => return Err(io_err(e.into_error())),
        None => return Err(io_err(io::Error::other("staged pack file went missing"))),
    };
    // The trailer is verified; the pack must be all there is.
    expect_end(&mut limited, limits)?;

    let resolved = resolve_objects(&tmp_path, file, &mut entries, repo, limits)?;

    let hex = resolved.checksum.to_hex().to_string();
    let pack_path = staging_dir.join(format!("pack-{hex}.pack"));
    let index_path = staging_dir.join(format!("pack-{hex}.idx"));
    let idx_tmp = staging_dir.join(format!("tmp_idx_{}", unique_suffix()));
    cleanup.0.push(idx_tmp.clone());
    write_index(&idx_tmp, &resolved.entries, resolved.checksum)?;

    fs::rename(&tmp_path, &pack_path).map_err(|e| ReceiveError::io(&pack_path, e))?;
    cleanup.0.push(pack_path.clone());
    fs::rename(&idx_tmp, &index_path).map_err(|e| ReceiveError::io(&index_path, e))?;
    cleanup.0.push(index_path.clone());

    let staged = StagedPack {
        id: resolved.checksum,
        pack_path,
        index_path,
        objects: resolved.entries.len() as u64,
        bytes: resolved.bytes,
    };
    Ok(Some(Received {
        staged,
        kinds: resolved.kinds,
        gitmodules: resolved.gitmodules,
        cleanup,
    }))
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn read_exact_classified<R: BufRead>(
    r: &mut Limited<'_, R>,
    buf: &mut [u8],
    limits: &Limits,
    at_start: bool,
) -> Result<(), ReceiveError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if at_start && filled == 0 => return Err(ReceiveError::MissingPack),
            Ok(0) => return Err(ReceiveError::PackTruncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if r.hit_limit => {
                return Err(ReceiveError::PackTooLarge {
                    limit: limits.max_pack_bytes,
                })
            }
            Err(e) => return Err(ReceiveError::io("<client>", e)),
        }
    }
    Ok(())
}

/// All of gix's error chain on one line.
pub(super) fn flatten(e: &gix_error::Error) -> String {
    // The innermost cause is the one a person can act on; outer layers of
    // gix errors repeat it wrapped in debug formatting.
    e.iter_errors()
        .map(|err| err.to_string())
        .filter(|s| !s.is_empty())
        .last()
        .unwrap_or_else(|| e.to_string())
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn classify_stream_error<R>(
    limited: &Limited<'_, R>,
    limits: &Limits,
    e: &gix_error::Error,
) -> ReceiveError {
    if limited.hit_limit {
        return ReceiveError::PackTooLarge {
            limit: limits.max_pack_bytes,
        };
    }
    if limited.hit_eof {
        return ReceiveError::PackTruncated;
    }
    let detail = flatten(e);
    if detail.contains("pack checksum") {
        return ReceiveError::PackChecksum;
    }
    ReceiveError::PackCorrupt { detail }
}

/// Where each entry of the staged pack is.
struct PackEntry {
    offset: u64,
    crc32: u32,
}

/// Parses the client's entries (which `limited` copies to the staged file)
/// and verifies the trailer; returns where each entry is.
fn stream_entries<R: BufRead>(
    limited: &mut Limited<'_, R>,
    header: [u8; HEADER_LEN],
) -> gix_error::Result<Vec<PackEntry>> {
    let stream = io::Cursor::new(header).chain(limited);
    let parsed = input::BytesToEntriesIter::new_from_header(
        stream,
        input::Mode::Verify,
        input::EntryDataMode::Crc32,
        gix_hash::Kind::Sha1,
    )?;
    let mut entries = Vec::with_capacity(parsed.len());
    for entry in parsed {
        let entry = entry?;
        entries.push(PackEntry {
            offset: entry.pack_offset,
            crc32: entry.crc32.unwrap_or_default(),
        });
    }
    Ok(entries)
}

struct Resolved {
    /// Sorted by id.
    entries: Vec<(ObjectId, PackEntry)>,
    kinds: HashMap<ObjectId, Kind>,
    /// Blobs the pack's trees name `.gitmodules`.
    gitmodules: BTreeSet<ObjectId>,
    checksum: ObjectId,
    bytes: u64,
}

/// Decodes every entry of the staged pack to learn its id and kind, running
/// fsck on each object on the way. Ref-delta bases found in neither the
/// pack nor earlier passes are thin-pack bases: they are copied from `repo`
/// and appended to the pack (as git's `index-pack --fix-thin` does), so the
/// pack becomes self-contained without any object appearing twice.
fn resolve_objects(
    path: &Path,
    mut file: File,
    entries: &mut Vec<PackEntry>,
    repo: &PackSet,
    limits: &Limits,
) -> Result<Resolved, ReceiveError> {
    let corrupt = |e: &gix_error::Error| {
        if e.is_resource_exhausted() {
            ReceiveError::ObjectTooLarge {
                limit: limits.alloc_limit_bytes,
            }
        } else {
            ReceiveError::PackCorrupt { detail: flatten(e) }
        }
    };
    let io_err = |e| ReceiveError::io(path, e);
    let open = || {
        gix_pack::data::File::at(path, gix_hash::Kind::Sha1)
            .map(|d| d.with_alloc_limit_bytes(Some(limits.alloc_limit_bytes)))
            .map_err(|e| corrupt(&e))
    };
    let mut data = open()?;

    let mut by_offset: HashMap<u64, (ObjectId, Kind)> = HashMap::with_capacity(entries.len());
    let mut by_id: HashMap<ObjectId, u64> = HashMap::with_capacity(entries.len());
    let mut inflate = gix_zlib::Inflate::default();
    let mut cache = gix_pack::cache::lru::StaticLinkedList::<64>::default();
    let mut buf = Vec::new();
    let mut pending: Vec<usize> = (0..entries.len()).collect();
    let mut deferred = Vec::new();
    let mut gitmodules = BTreeSet::new();
    let reader = repo.reader();

    // Offset deltas always point backwards, so one pass in pack order
    // resolves everything except ref-deltas to bases later in the pack;
    // those are retried until no more progress is made.
    loop {
        let before = pending.len();
        for &i in &pending {
            let offset = entries[i].offset;
            let entry = data.entry(offset).map_err(|e| corrupt(&e))?;
            if missing_base(&data, &entry, &by_id).is_some() {
                deferred.push(i);
                continue;
            }
            let resolve =
                |id: &gix_hash::oid, _: &mut Vec<u8>| -> gix_error::Result<Option<ResolvedBase>> {
                    match by_id.get(id) {
                        Some(&ofs) => Ok(Some(ResolvedBase::InPack(data.entry(ofs)?))),
                        None => Ok(None),
                    }
                };
            let outcome = data
                .decode_entry(entry, &mut buf, &mut inflate, &resolve, &mut cache)
                .map_err(|e| corrupt(&e))?;
            let kind = outcome.kind;
            let id = gix_object::compute_hash(gix_hash::Kind::Sha1, kind, &buf)
                .map_err(|e| corrupt(&e))?;
            check_object_marking(kind, &buf, &mut gitmodules).map_err(|e| ReceiveError::Fsck {
                id,
                kind,
                msg_id: e.msg_id,
                detail: e.detail,
            })?;
            if by_id.insert(id, offset).is_some() {
                // git's index-pack refuses these too.
                return Err(ReceiveError::DuplicateObject { id });
            }
            by_offset.insert(offset, (id, kind));
        }
        pending = std::mem::take(&mut deferred);
        if pending.is_empty() {
            break;
        }
        if pending.len() < before {
            continue;
        }
        // No progress: the remaining chains wait for bases outside the
        // pack. Fetch them from the repository and append them.
        let mut missing: Vec<ObjectId> = Vec::new();
        for &i in &pending {
            let entry = data.entry(entries[i].offset).map_err(|e| corrupt(&e))?;
            if let Some(base) = missing_base(&data, &entry, &by_id) {
                if !missing.contains(&base) {
                    missing.push(base);
                }
            }
        }
        if missing.is_empty() {
            return Err(ReceiveError::PackCorrupt {
                detail: "delta chain cannot be resolved".into(),
            });
        }
        drop(data);
        let trailer_at = file
            .seek(SeekFrom::End(-(HASH_LEN as i64)))
            .map_err(io_err)?;
        file.set_len(trailer_at).map_err(io_err)?;
        let mut pos = trailer_at;
        let mut out = BufWriter::new(&mut file);
        for base in missing {
            let Some((kind, obj)) = reader.find(&base, &mut buf)? else {
                return Err(ReceiveError::MissingDeltaBase { base });
            };
            let obj = gix_object::Data {
                kind,
                data: obj,
                object_hash: gix_hash::Kind::Sha1,
            };
            let entry = input::Entry::from_data_obj(&obj, pos, gix_zlib::Compression::BEST_SPEED)
                .map_err(|e| corrupt(&e))?;
            entry
                .header
                .write_to(entry.decompressed_size, &mut out)
                .map_err(io_err)?;
            out.write_all(entry.compressed.as_deref().unwrap_or_default())
                .map_err(io_err)?;
            pending.push(entries.len());
            entries.push(PackEntry {
                offset: pos,
                crc32: entry.crc32.unwrap_or_else(|| entry.compute_crc32()),
            });
            pos += entry.bytes_in_pack();
        }
        out.flush().map_err(io_err)?;
        drop(out);
        let count = u32::try_from(entries.len()).map_err(|_| ReceiveError::TooManyObjects {
            announced: u32::MAX,
            limit: limits.max_objects,
        })?;
        reseal(&mut file, pos, count).map_err(io_err)?;
        data = open()?;
    }

    let checksum = data.checksum();
    let bytes = data.data_len() as u64;
    drop(data);
    file.sync_all().map_err(io_err)?;

    let mut kinds = HashMap::with_capacity(by_offset.len());
    let mut sorted = Vec::with_capacity(entries.len());
    for e in entries.iter() {
        let Some(&(id, kind)) = by_offset.get(&e.offset) else {
            return Err(ReceiveError::PackCorrupt {
                detail: format!("entry at offset {} was not resolved", e.offset),
            });
        };
        kinds.insert(id, kind);
        sorted.push((
            id,
            PackEntry {
                offset: e.offset,
                crc32: e.crc32,
            },
        ));
    }
    sorted.sort_by_key(|e| e.0);
    Ok(Resolved {
        entries: sorted,
        kinds,
        gitmodules,
        checksum,
        bytes,
    })
}

/// Rewrites the header's object count and appends a fresh trailer after
/// `end`, the end of the last entry.
fn reseal(file: &mut File, end: u64, count: u32) -> io::Result<()> {
    let header = gix_pack::data::header::encode(gix_pack::data::Version::V2, count);
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.seek(SeekFrom::Start(0))?;
    let mut h = gix_hash::hasher(gix_hash::Kind::Sha1);
    let mut buf = vec![0u8; 1 << 16];
    let mut reader = (&mut *file).take(end);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.try_finalize().map_err(io::Error::other)?;
    file.seek(SeekFrom::Start(end))?;
    file.write_all(digest.as_slice())
}

/// Longest delta chain followed when checking whether a base is available;
/// git's own limit for pack-objects is far below this.
const MAX_CHAIN: usize = 10_000;

/// The first unresolved ref-delta base on the chain of `entry`, if any. A
/// broken chain yields `None` so that decoding reports the corruption.
fn missing_base(
    data: &gix_pack::data::File,
    entry: &gix_pack::data::Entry,
    by_id: &HashMap<ObjectId, u64>,
) -> Option<ObjectId> {
    let mut current = entry.clone();
    for _ in 0..MAX_CHAIN {
        match current.header {
            Header::RefDelta { base_id } => {
                return (!by_id.contains_key(&base_id)).then_some(base_id);
            }
            Header::OfsDelta { base_distance } => {
                let base = current.checked_base_pack_offset(base_distance)?;
                current = data.entry(base).ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// Writes a version 2 pack index (gitformat-pack) for `entries`.
fn write_index(
    path: &Path,
    entries: &[(ObjectId, PackEntry)],
    pack_checksum: ObjectId,
) -> Result<(), ReceiveError> {
    let io_err = |e| ReceiveError::io(path, e);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 16, file),
        hasher: gix_hash::hasher(gix_hash::Kind::Sha1),
    };
    write_index_body(&mut out, entries, pack_checksum).map_err(io_err)?;
    let HashingWriter { inner, hasher } = out;
    let checksum = hasher
        .try_finalize()
        .map_err(|e| ReceiveError::PackCorrupt {
            detail: e.to_string(),
        })?;
    let mut file = inner.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.write_all(checksum.as_slice()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn write_index_body(
    out: &mut impl Write,
    entries: &[(ObjectId, PackEntry)],
    pack_checksum: ObjectId,
) -> io::Result<()> {
    out.write_all(b"\xfftOc")?;
    out.write_all(&2u32.to_be_bytes())?;
    let mut fanout = [0u32; 256];
    for (id, _) in entries {
        fanout[usize::from(id.as_slice()[0])] += 1;
    }
    let mut total = 0u32;
    for count in fanout {
        total += count;
        out.write_all(&total.to_be_bytes())?;
    }
    for (id, _) in entries {
        out.write_all(id.as_slice())?;
    }
    for (_, e) in entries {
        out.write_all(&e.crc32.to_be_bytes())?;
    }
    // Offsets that do not fit 31 bits go to a table of 64-bit offsets,
    // referenced by index with the high bit set.
    let mut large = Vec::new();
    for (_, e) in entries {
        match u32::try_from(e.offset) {
            Ok(small) if small < 0x8000_0000 => out.write_all(&small.to_be_bytes())?,
            _ => {
                let slot = u32::try_from(large.len()).map_err(io::Error::other)?;
                out.write_all(&(0x8000_0000u32 | slot).to_be_bytes())?;
                large.push(e.offset);
            }
        }
    }
    for offset in large {
        out.write_all(&offset.to_be_bytes())?;
    }
    out.write_all(pack_checksum.as_slice())
}

struct HashingWriter<W> {
    inner: W,
    hasher: gix_hash::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::receive::{Command, FsckId};

    /// A pack of full blobs, built by hand.
    fn pack_of_blobs(blobs: &[&[u8]]) -> Vec<u8> {
        let objects: Vec<(Kind, &[u8])> = blobs.iter().map(|b| (Kind::Blob, *b)).collect();
        pack_of(&objects)
    }

    /// A pack of whole (undeltified) objects, built by hand.
    fn pack_of(objects: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut out = b"PACK".to_vec();
        out.extend_from_slice(&2u32.to_be_bytes());
        out.extend_from_slice(&(objects.len() as u32).to_be_bytes());
        for (kind, blob) in objects {
            let code: u8 = match kind {
                Kind::Commit => 1,
                Kind::Tree => 2,
                Kind::Blob => 3,
                Kind::Tag => 4,
            };
            let mut size = blob.len();
            let mut byte = (code << 4) | (size & 0x0f) as u8;
            size >>= 4;
            while size > 0 {
                out.push(byte | 0x80);
                byte = (size & 0x7f) as u8;
                size >>= 7;
            }
            out.push(byte);
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(blob).unwrap();
            out.extend_from_slice(&z.finish().unwrap());
        }
        let mut h = gix_hash::hasher(gix_hash::Kind::Sha1);
        h.update(&out);
        out.extend_from_slice(h.try_finalize().unwrap().as_slice());
        out
    }

    fn request(new: ObjectId) -> PushRequest {
        PushRequest {
            commands: vec![Command {
                old: gix_hash::Kind::Sha1.null(),
                new,
                name: "refs/tags/blob".into(),
            }],
            caps: Default::default(),
            push_options: Vec::new(),
        }
    }

    fn blob_id(data: &[u8]) -> ObjectId {
        gix_object::compute_hash(gix_hash::Kind::Sha1, Kind::Blob, data).unwrap()
    }

    fn run(
        pack: &[u8],
        new: ObjectId,
        limits: &Limits,
    ) -> (Result<Ingested, ReceiveError>, tempfile::TempDir) {
        run_in(pack, new, limits, &PackSet::default())
    }

    fn run_in(
        pack: &[u8],
        new: ObjectId,
        limits: &Limits,
        repo: &PackSet,
    ) -> (Result<Ingested, ReceiveError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let res = ingest(&request(new), &mut &pack[..], repo, dir.path(), limits);
        (res, dir)
    }

    fn id_of(kind: Kind, data: &[u8]) -> ObjectId {
        gix_object::compute_hash(gix_hash::Kind::Sha1, kind, data).unwrap()
    }

    /// A tree of `(mode, name, id)` entries, given in git's order.
    fn tree(entries: &[(&str, &str, ObjectId)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (mode, name, id) in entries {
            out.extend_from_slice(format!("{mode} {name}\0").as_bytes());
            out.extend_from_slice(id.as_slice());
        }
        out
    }

    fn fsck_id(res: &Result<Ingested, ReceiveError>) -> Option<(FsckId, String)> {
        match res {
            Err(ReceiveError::Fsck { msg_id, detail, .. }) => Some((*msg_id, detail.clone())),
            _ => None,
        }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn stages_a_pack_with_index() {
        let blobs: [&[u8]; 2] = [b"hello\n", &[7u8; 3000]];
        let pack = pack_of_blobs(&blobs);
        let (res, dir) = run(&pack, blob_id(blobs[1]), &Limits::default());
        let ingested = res.unwrap();
        assert_eq!(ingested.command_errors, vec![None]);
        let staged = ingested.pack.unwrap();
        assert_eq!(staged.objects, 2);
        assert_eq!(staged.bytes, pack.len() as u64);
        assert_eq!(staged.id.as_slice(), &pack[pack.len() - 20..]);
        let hex = staged.id.to_hex().to_string();
        assert_eq!(
            files_in(dir.path()),
            vec![format!("pack-{hex}.idx"), format!("pack-{hex}.pack")]
        );
        let set = PackSet::open(&[&staged.index_path]).unwrap();
        let mut buf = Vec::new();
        for blob in blobs {
            let (kind, data) = set
                .reader()
                .get(&blob_id(blob), &mut buf)
                .map(|(k, d)| (k, d.to_vec()))
                .unwrap();
            assert_eq!((kind, data.as_slice()), (Kind::Blob, blob));
        }
        staged.discard().unwrap();
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn empty_pack_stages_nothing_and_reports_missing_objects() {
        let pack = pack_of_blobs(&[]);
        let (res, dir) = run(&pack, blob_id(b"x"), &Limits::default());
        let ingested = res.unwrap();
        assert!(ingested.pack.is_none());
        assert_eq!(
            ingested.command_errors,
            vec![Some("missing necessary objects".to_owned())]
        );
        assert!(files_in(dir.path()).is_empty());

        let mut bad = pack.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let (res, _dir) = run(&bad, blob_id(b"x"), &Limits::default());
        assert!(matches!(res, Err(ReceiveError::PackChecksum)), "{res:?}");
    }

    #[test]
    fn limits_and_malformed_headers() {
        let big = [1u8; 5000];
        let pack = pack_of_blobs(&[&big]);
        let id = blob_id(&big);
        let tiny = Limits {
            max_pack_bytes: 40,
            ..Limits::default()
        };
        let (res, dir) = run(&pack, id, &tiny);
        assert!(
            matches!(res, Err(ReceiveError::PackTooLarge { limit: 40 })),
            "{res:?}"
        );
        assert!(files_in(dir.path()).is_empty());

        let few = Limits {
            max_objects: 0,
            ..Limits::default()
        };
        let (res, _) = run(&pack, id, &few);
        assert!(
            matches!(
                res,
                Err(ReceiveError::TooManyObjects {
                    announced: 1,
                    limit: 0
                })
            ),
            "{res:?}"
        );

        let small_alloc = Limits {
            alloc_limit_bytes: 1000,
            ..Limits::default()
        };
        let (res, dir) = run(&pack, id, &small_alloc);
        assert!(
            matches!(res, Err(ReceiveError::ObjectTooLarge { limit: 1000 })),
            "{res:?}"
        );
        assert!(files_in(dir.path()).is_empty());

        let mut v9 = pack.clone();
        v9[7] = 9;
        let (res, _) = run(&v9, id, &Limits::default());
        assert!(
            matches!(res, Err(ReceiveError::BadPackHeader { .. })),
            "{res:?}"
        );

        let (res, dir) = run(&pack[..pack.len() - 1], id, &Limits::default());
        assert!(matches!(res, Err(ReceiveError::PackTruncated)), "{res:?}");
        assert!(files_in(dir.path()).is_empty());

        let (res, _) = run(b"", id, &Limits::default());
        assert!(matches!(res, Err(ReceiveError::MissingPack)), "{res:?}");
    }

    #[test]
    fn duplicate_objects_are_rejected() {
        let pack = pack_of_blobs(&[b"same", b"same"]);
        let (res, dir) = run(&pack, blob_id(b"same"), &Limits::default());
        assert!(
            matches!(res, Err(ReceiveError::DuplicateObject { .. })),
            "{res:?}"
        );
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn junk_after_the_trailer_is_refused() {
        let blob: &[u8] = b"hello\n";
        for pack in [pack_of_blobs(&[blob]), pack_of_blobs(&[])] {
            for junk in [&b"x"[..], &[0x5a; 70]] {
                let mut sent = pack.clone();
                sent.extend_from_slice(junk);
                let (res, dir) = run(&sent, blob_id(blob), &Limits::default());
                assert!(matches!(res, Err(ReceiveError::PackJunk)), "{res:?}");
                assert!(files_in(dir.path()).is_empty());
            }
            // Exactly at the end: accepted.
            let (res, _dir) = run(&pack, blob_id(blob), &Limits::default());
            assert!(res.is_ok(), "{res:?}");
        }

        // A bidirectional session does not look past the pack; the rest of
        // the stream stays unread.
        let mut sent = pack_of_blobs(&[blob]);
        let len = sent.len();
        sent.extend_from_slice(b"more");
        let open = Limits {
            require_eof_after_pack: false,
            ..Limits::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut input = &sent[..];
        let res = ingest(
            &request(blob_id(blob)),
            &mut input,
            &PackSet::default(),
            dir.path(),
            &open,
        );
        assert_eq!(res.unwrap().command_errors, vec![None]);
        assert_eq!(input, b"more");
        assert_eq!(sent.len() - input.len(), len);
    }

    const GOOD_GITMODULES: &[u8] =
        b"[submodule \"lib\"]\n\tpath = lib\n\turl = https://example.com/lib.git\n";
    const EVIL_GITMODULES: &[u8] =
        b"[submodule \"../../../../../hooks\"]\n\tpath = -evil\n\turl = -u./payload\n";

    #[test]
    fn gitmodules_blobs_in_the_pack_are_checked() {
        // Ok: the per-command errors; Err: the fsck problem.
        let check = |objects: &[(Kind, &[u8])], tip: ObjectId| {
            let (res, dir) = run(&pack_of(objects), tip, &Limits::default());
            match res {
                Ok(ingested) => Ok(ingested.command_errors),
                Err(ReceiveError::Fsck { msg_id, detail, .. }) => {
                    assert!(files_in(dir.path()).is_empty());
                    Err((msg_id, detail))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let blob = |data: &'static [u8]| (Kind::Blob, data, id_of(Kind::Blob, data));

        // Fine, with the blob after the tree that names it.
        let (k, good, good_id) = blob(GOOD_GITMODULES);
        let t = tree(&[("100644", ".gitmodules", good_id)]);
        let got = check(&[(Kind::Tree, &t), (k, good)], id_of(Kind::Tree, &t));
        assert_eq!(got, Ok(vec![None]));

        // The attack, named through an NTFS alias: the name is the first
        // problem git reports too.
        let (k, evil, evil_id) = blob(EVIL_GITMODULES);
        let t = tree(&[("100644", "GITMOD~1", evil_id)]);
        let got = check(&[(k, evil), (Kind::Tree, &t)], id_of(Kind::Tree, &t)).unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesName,
                "disallowed submodule name: ../../../../../hooks".into()
            )
        );

        // Not git-config syntax.
        let (k, bad, bad_id) = blob(b"[submodule \"x\"\n\tpath = x\n");
        let t = tree(&[("100644", ".gitmodules", bad_id)]);
        let got = check(&[(k, bad), (Kind::Tree, &t)], id_of(Kind::Tree, &t)).unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesParse,
                "could not parse gitmodules blob".into()
            )
        );

        // Too large to parse, decided before inflating it.
        let mut big = b"[submodule \"x\"]\n\tpath = x\n#".to_vec();
        big.resize(gitmodules::MAX_GITMODULES_SIZE as usize + 1, b'#');
        let big_id = id_of(Kind::Blob, &big);
        let t = tree(&[("100644", ".gitmodules", big_id)]);
        let got = check(
            &[(Kind::Blob, &big), (Kind::Tree, &t)],
            id_of(Kind::Tree, &t),
        )
        .unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesLarge,
                ".gitmodules too large to parse".into()
            )
        );

        // A symlink of that name.
        let (k, target, target_id) = blob(b"../../.git/config");
        let t = tree(&[("120000", ".gitmodules", target_id)]);
        let got = check(&[(k, target), (Kind::Tree, &t)], id_of(Kind::Tree, &t)).unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesSymlink,
                ".gitmodules is a symbolic link".into()
            )
        );

        // Not a blob, and nowhere at all.
        let inner = tree(&[("100644", "a", good_id)]);
        let inner_id = id_of(Kind::Tree, &inner);
        let t = tree(&[("100644", ".gitmodules", inner_id)]);
        let got = check(
            &[
                (Kind::Blob, GOOD_GITMODULES),
                (Kind::Tree, &inner),
                (Kind::Tree, &t),
            ],
            id_of(Kind::Tree, &t),
        )
        .unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesBlob,
                "non-blob found at .gitmodules".into()
            )
        );
        let t = tree(&[("100644", ".gitmodules", id_of(Kind::Blob, b"absent"))]);
        let got = check(&[(Kind::Tree, &t)], id_of(Kind::Tree, &t)).unwrap_err();
        assert_eq!(
            got,
            (
                FsckId::GitmodulesMissing,
                "unable to read .gitmodules blob".into()
            )
        );
    }

    #[test]
    fn gitmodules_blob_already_stored_is_checked_when_newly_named() {
        // The repository got the blobs earlier under innocent names.
        let store = tempfile::tempdir().unwrap();
        let ingested = ingest(
            &request(id_of(Kind::Blob, EVIL_GITMODULES)),
            &mut &pack_of_blobs(&[EVIL_GITMODULES, GOOD_GITMODULES])[..],
            &PackSet::default(),
            store.path(),
            &Limits::default(),
        )
        .unwrap();
        let repo = PackSet::open(&[ingested.pack.unwrap().index_path]).unwrap();

        let t = tree(&[("100644", ".gitmodules", id_of(Kind::Blob, EVIL_GITMODULES))]);
        let (res, dir) = run_in(
            &pack_of(&[(Kind::Tree, &t)]),
            id_of(Kind::Tree, &t),
            &Limits::default(),
            &repo,
        );
        assert_eq!(
            fsck_id(&res),
            Some((
                FsckId::GitmodulesName,
                "disallowed submodule name: ../../../../../hooks".into()
            ))
        );
        assert!(files_in(dir.path()).is_empty());
        let Err(e) = res else { unreachable!() };
        assert_eq!(
            e.ref_reason(),
            "gitmodulesName: disallowed submodule name: ../../../../../hooks"
        );

        let t = tree(&[("100644", ".gitmodules", id_of(Kind::Blob, GOOD_GITMODULES))]);
        let (res, _dir) = run_in(
            &pack_of(&[(Kind::Tree, &t)]),
            id_of(Kind::Tree, &t),
            &Limits::default(),
            &repo,
        );
        assert_eq!(res.unwrap().command_errors, vec![None]);
    }
}
