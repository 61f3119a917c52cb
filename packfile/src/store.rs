//! Read access to a repository's objects: an explicit, ordered set of
//! immutable pack bundles (`pack-<sha>.pack` + `.idx`).
//!
//! The set is explicit (not a directory scan) because the storage node's
//! pack list in RocksDB is the truth about which packs are committed. Every
//! pack Cairn keeps is self-contained: thin packs are completed on receipt,
//! so ref-deltas always resolve inside their own pack.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use gix_hash::{oid, ObjectId};
use gix_object::Kind;
use gix_pack::cache::lru::StaticLinkedList;
use gix_pack::data::decode::header::ResolvedBase;

/// Errors opening or reading packs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open pack index {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("cannot decode object {id}: {message}")]
    Decode { id: ObjectId, message: String },
    #[error("object {id} not found")]
    Missing { id: ObjectId },
}

/// Where an object's entry lives: which bundle of the set and at what offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryLocation {
    pub pack: usize,
    pub offset: u64,
}

/// A pack's entries in pack order: `(offset, index position)`, sorted by
/// offset, so the extent of an entry and the id at an offset are found by
/// binary search. Built once per pack and shared by every request.
pub struct RevIndex {
    pub entries: Vec<(u64, u32)>,
    pub pack_end: u64,
}

impl RevIndex {
    pub fn build(bundle: &gix_pack::Bundle) -> Self {
        let n = bundle.index.num_objects();
        let mut entries: Vec<(u64, u32)> = (0..n)
            .map(|i| (bundle.index.pack_offset_at_index(i), i))
            .collect();
        entries.sort_unstable();
        RevIndex {
            entries,
            pack_end: bundle.pack.pack_end() as u64,
        }
    }

    /// Sorted position of the entry starting at `offset`.
    pub fn find(&self, offset: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&offset, |e| e.0).ok()
    }

    /// End of the entry at sorted position `pos` (start of the next one).
    pub fn end(&self, pos: usize) -> u64 {
        self.entries.get(pos + 1).map_or(self.pack_end, |e| e.0)
    }
}

/// An immutable, cheaply clonable set of pack bundles.
#[derive(Clone, Default)]
pub struct PackSet {
    bundles: Vec<Arc<gix_pack::Bundle>>,
    revs: Vec<Arc<OnceLock<RevIndex>>>,
}

impl PackSet {
    /// Opens the bundles whose `.idx` (or `.pack`) paths are given, in order.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, StoreError> {
        let mut bundles = Vec::with_capacity(paths.len());
        for p in paths {
            bundles.push(Arc::new(open_bundle(p.as_ref())?));
        }
        let revs = bundles.iter().map(|_| Arc::default()).collect();
        Ok(PackSet { bundles, revs })
    }

    /// This set plus one more bundle (e.g. a freshly received pack).
    pub fn with_bundle(&self, bundle: Arc<gix_pack::Bundle>) -> Self {
        let mut bundles = self.bundles.clone();
        bundles.push(bundle);
        let mut revs = self.revs.clone();
        revs.push(Arc::default());
        PackSet { bundles, revs }
    }

    pub fn bundles(&self) -> &[Arc<gix_pack::Bundle>] {
        &self.bundles
    }

    /// The pack-order index of bundle `pack`, built on first use.
    ///
    /// # Panics
    /// If `pack` is not a position in this set.
    pub fn rev_index(&self, pack: usize) -> &RevIndex {
        self.revs[pack].get_or_init(|| RevIndex::build(&self.bundles[pack]))
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// The first location of `id` in the set, if present.
    pub fn locate(&self, id: &oid) -> Option<EntryLocation> {
        self.bundles.iter().enumerate().find_map(|(pack, b)| {
            b.index.lookup(id).map(|i| EntryLocation {
                pack,
                offset: b.index.pack_offset_at_index(i),
            })
        })
    }

    pub fn contains(&self, id: &oid) -> bool {
        self.bundles.iter().any(|b| b.index.lookup(id).is_some())
    }

    /// A reader with its own decode caches; not shared between threads.
    pub fn reader(&self) -> ObjectReader<'_> {
        ObjectReader {
            packs: self,
            state: RefCell::new(ReadState {
                inflate: gix_zlib::Inflate::default(),
                cache: StaticLinkedList::<64>::default(),
            }),
        }
    }
}

/// Opens one bundle from its `.idx` or `.pack` path.
pub fn open_bundle(path: &Path) -> Result<gix_pack::Bundle, StoreError> {
    gix_pack::Bundle::at(path, gix_hash::Kind::Sha1).map_err(|e| StoreError::Open {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

struct ReadState {
    inflate: gix_zlib::Inflate,
    cache: StaticLinkedList<64>,
}

/// Decodes objects from a [`PackSet`].
pub struct ObjectReader<'a> {
    packs: &'a PackSet,
    state: RefCell<ReadState>,
}

impl<'a> ObjectReader<'a> {
    pub fn packs(&self) -> &'a PackSet {
        self.packs
    }

    /// Decodes `id` into `buf`; `Ok(None)` if no pack has it.
    pub fn find<'b>(
        &self,
        id: &oid,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<(Kind, &'b [u8])>, StoreError> {
        for b in &self.packs.bundles {
            let Some(idx) = b.index.lookup(id) else {
                continue;
            };
            let mut st = self.state.borrow_mut();
            let ReadState { inflate, cache } = &mut *st;
            let (data, _) = b
                .get_object_by_index(idx, buf, inflate, cache)
                .map_err(|e| StoreError::Decode {
                    id: id.to_owned(),
                    message: e.to_string(),
                })?;
            return Ok(Some((data.kind, data.data)));
        }
        Ok(None)
    }

    /// Like [`find`](Self::find) but a missing object is an error.
    pub fn get<'b>(&self, id: &oid, buf: &'b mut Vec<u8>) -> Result<(Kind, &'b [u8]), StoreError> {
        self.find(id, buf)?
            .ok_or_else(|| StoreError::Missing { id: id.to_owned() })
    }

    /// The kind and size of `id` read from pack entry headers, without
    /// inflating the object (a delta's result size is in its first bytes);
    /// `Ok(None)` if no pack has it.
    pub fn header(&self, id: &oid) -> Result<Option<(Kind, u64)>, StoreError> {
        let decode_err = |e: gix_error::Error| StoreError::Decode {
            id: id.to_owned(),
            message: e.to_string(),
        };
        for b in &self.packs.bundles {
            let Some(idx) = b.index.lookup(id) else {
                continue;
            };
            let entry = b
                .pack
                .entry(b.index.pack_offset_at_index(idx))
                .map_err(decode_err)?;
            // Every pack is self-contained, so ref-delta bases are in it.
            let resolve = |base: &oid| -> gix_error::Result<Option<ResolvedBase>> {
                match b.index.lookup(base) {
                    Some(i) => Ok(Some(ResolvedBase::InPack(
                        b.pack.entry(b.index.pack_offset_at_index(i))?,
                    ))),
                    None => Ok(None),
                }
            };
            let mut st = self.state.borrow_mut();
            let header = b
                .pack
                .decode_header(entry, &mut st.inflate, &resolve)
                .map_err(decode_err)?;
            return Ok(Some((header.kind, header.object_size)));
        }
        Ok(None)
    }

    /// The kind of `id` without keeping its data.
    pub fn kind(&self, id: &oid) -> Result<Option<Kind>, StoreError> {
        let mut buf = Vec::new();
        Ok(self.find(id, &mut buf)?.map(|(k, _)| k))
    }
}

impl gix_object::Find for ObjectReader<'_> {
    fn try_find<'b>(
        &self,
        id: &oid,
        buffer: &'b mut Vec<u8>,
    ) -> gix_error::Result<Option<gix_object::Data<'b>>> {
        match self.find(id, buffer) {
            Ok(Some((kind, data))) => Ok(Some(gix_object::Data {
                kind,
                data,
                object_hash: gix_hash::Kind::Sha1,
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(gix_error::Error::from_error(e)),
        }
    }
}

/// A [`PackSet`] handle that is `Send + Sync` and implements
/// `gix_object::Find` with a fresh decode state per call; used where gix
/// needs an owned lookup (thin-pack completion while indexing).
#[derive(Clone)]
pub struct SharedFind(pub PackSet);

impl gix_object::Find for SharedFind {
    fn try_find<'b>(
        &self,
        id: &oid,
        buffer: &'b mut Vec<u8>,
    ) -> gix_error::Result<Option<gix_object::Data<'b>>> {
        self.0.reader().try_find(id, buffer)
    }
}
