//! Typed persistent objects over any [`Storage`]: values of Rust types,
//! typed references between them, transactions that retry on conflicts,
//! and an object cache bounded in bytes.
//!
//! Records stay Durus records (oid, data, references), so the collector,
//! `check`, `migrate`, `backup`, `export`, the server and the PostgreSQL
//! backend work unchanged on a store written by Rust objects. A record's
//! data is a marker, the value's type tag, and the value encoded by
//! rmp-serde with named fields (adding a field with `#[serde(default)]` is
//! a compatible change). Its references are collected while the value is
//! encoded: every [`Ref`] in it is one, with no derive beyond serde's.
//! Python clients cannot unpickle these records, and this layer refuses
//! a pickle with a clear error.
//!
//! A transaction commits only onto the state it read: the storage refuses
//! its commit when another session changed an object it read or wrote
//! since it began ([`Storage::end_checked`]), and [`Db::transact`] runs it
//! again. [`PMap`] and [`PSet`] are an ordered map and set for millions of
//! entries, loaded node by node.
//!
//! ```
//! use durus_redb::object::{Db, Persistent, Ref};
//! use durus_redb::MemoryStorage;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Account { owner: String, balance: i64 }
//! impl Persistent for Account { const TAG: &'static str = "example.Account"; }
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Bank { accounts: Vec<Ref<Account>> }
//! impl Persistent for Bank { const TAG: &'static str = "example.Bank"; }
//!
//! let mut db = Db::new(MemoryStorage::new());
//! db.transact(|tx| {
//!     let alice = tx.insert(Account { owner: "alice".into(), balance: 10 })?;
//!     tx.set_root(Bank { accounts: vec![alice] })
//! })?;
//! let total = db.transact(|tx| {
//!     let bank = tx.root::<Bank>()?.expect("a root");
//!     let mut total = 0;
//!     for a in &bank.accounts {
//!         total += tx.get(*a)?.balance;
//!     }
//!     Ok(total)
//! })?;
//! assert_eq!(total, 10);
//! # Ok::<(), durus_redb::object::ObjectError>(())
//! ```

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Conflict, StorageError};
use crate::record::{Oid, Record};
use crate::storage::Storage;

/// The first bytes of a Rust object's record data.
const MARKER: &[u8; 4] = b"DRO1";

/// A value that can be stored as an object. `TAG` names its type in the
/// store (keep it when the type is renamed or moved).
pub trait Persistent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The type's name in the store.
    const TAG: &'static str;
}

/// A typed reference to a stored object. Within an object it is encoded as
/// its oid and counted among the record's references.
pub struct Ref<T> {
    oid: Oid,
    _type: PhantomData<fn() -> T>,
}

impl<T> Ref<T> {
    /// The reference to the object stored under `oid`.
    pub fn from_oid(oid: Oid) -> Ref<T> {
        Ref {
            oid,
            _type: PhantomData,
        }
    }

    /// The object's oid.
    pub fn oid(&self) -> Oid {
        self.oid
    }
}

impl<T> Clone for Ref<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ref<T> {}
impl<T> PartialEq for Ref<T> {
    fn eq(&self, other: &Self) -> bool {
        self.oid == other.oid
    }
}
impl<T> Eq for Ref<T> {}
impl<T> std::hash::Hash for Ref<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.oid.hash(h)
    }
}
impl<T> std::fmt::Debug for Ref<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ref({})", self.oid)
    }
}

thread_local! {
    /// The references met while an object is encoded.
    static REFS: RefCell<Option<Vec<Oid>>> = const { RefCell::new(None) };
}

impl<T> Serialize for Ref<T> {
    fn serialize<Z: serde::Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        REFS.with(|r| {
            if let Some(refs) = r.borrow_mut().as_mut() {
                refs.push(self.oid);
            }
        });
        s.serialize_u64(self.oid.0)
    }
}

impl<'de, T> Deserialize<'de> for Ref<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Ref::from_oid(Oid(u64::deserialize(d)?)))
    }
}

/// What went wrong with an object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The record is not a Rust object (a Python pickle, say).
    #[error(
        "oid {oid} is not a Rust object of durus-redb's object layer (a Python Durus \
         pickle?): its data does not begin with the marker DRO1"
    )]
    NotAnObject {
        /// The oid.
        oid: Oid,
    },
    /// The object is of another type than the one asked for.
    #[error("oid {oid} holds a {found}, not a {expected}")]
    WrongType {
        /// The oid.
        oid: Oid,
        /// The tag asked for.
        expected: &'static str,
        /// The tag stored.
        found: String,
    },
    /// The value could not be encoded or decoded.
    #[error("oid {oid}: {why}")]
    Codec {
        /// The oid.
        oid: Oid,
        /// What serde said.
        why: String,
    },
    /// A transaction still conflicted after its last try.
    #[error("the transaction conflicted {tries} times; the last: {last}")]
    TooManyConflicts {
        /// How often it ran.
        tries: u32,
        /// The last conflict.
        last: StorageError,
    },
}

/// Whether running a transaction again may succeed: another session
/// changed what it read or wrote.
fn retryable(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::ReadConflict(_)
            | StorageError::Conflict(
                Conflict::Refused | Conflict::Invalidated { .. } | Conflict::OrderMoved
            )
    )
}

/// A record's data for `value`, and the references it holds.
fn encode<T: Persistent>(oid: Oid, value: &T) -> Result<(Vec<u8>, Vec<Oid>), ObjectError> {
    REFS.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let body = rmp_serde::to_vec_named(value);
    let mut refs = REFS.with(|r| r.borrow_mut().take()).unwrap_or_default();
    let body = body.map_err(|e| ObjectError::Codec {
        oid,
        why: e.to_string(),
    })?;
    refs.sort_unstable();
    refs.dedup();
    let tag = T::TAG.as_bytes();
    let mut data = Vec::with_capacity(MARKER.len() + 2 + tag.len() + body.len());
    data.extend_from_slice(MARKER);
    data.extend_from_slice(&(tag.len() as u16).to_be_bytes());
    data.extend_from_slice(tag);
    data.extend_from_slice(&body);
    Ok((data, refs))
}

/// The value of a record's data.
fn decode<T: Persistent>(oid: Oid, data: &[u8]) -> Result<T, ObjectError> {
    let rest = data
        .strip_prefix(MARKER.as_slice())
        .ok_or(ObjectError::NotAnObject { oid })?;
    let codec = |why: &str| ObjectError::Codec {
        oid,
        why: why.to_string(),
    };
    let (len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| codec("the record ends inside its type tag"))?;
    let len = u16::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(codec("the record ends inside its type tag"));
    }
    let (tag, body) = rest.split_at(len);
    if tag != T::TAG.as_bytes() {
        return Err(ObjectError::WrongType {
            oid,
            expected: T::TAG,
            found: String::from_utf8_lossy(tag).into_owned(),
        });
    }
    rmp_serde::from_slice(body).map_err(|e| codec(&e.to_string()))
}

/// What an object decoded from the record `data` holds in memory, in
/// bytes, estimated from its MessagePack body: `inline` (the value's own
/// size), every scalar 8 bytes, every string or byte string its header
/// and its heap block, every array or map its header and block (their
/// elements counted as they come), and what the cache spends on keeping
/// it. Field names count as strings, so it errs high for structs.
fn footprint(data: &[u8], inline: usize) -> usize {
    use rmp::Marker;
    /// What the allocator takes for a block of `n` bytes.
    fn block(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            n.saturating_add(8).div_ceil(16).max(2).saturating_mul(16)
        }
    }
    /// The cache's own cost per object: its entry, its place in the order
    /// of use, the shared pointer.
    const KEPT: usize = 128;
    let body = data
        .strip_prefix(MARKER.as_slice())
        .and_then(|rest| rest.split_first_chunk::<2>())
        .and_then(|(len, rest)| rest.get(u16::from_be_bytes(*len) as usize..))
        .unwrap_or(data);
    let mut total = inline + KEPT;
    let mut at = 0usize;
    // Values still to be read: one to begin with, and each array's or
    // map's elements as they are announced.
    let mut pending: u64 = 1;
    let be = |at: usize, n: usize| -> usize {
        body.get(at..at + n)
            .map(|b| b.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize))
            .unwrap_or(0)
    };
    while pending > 0 && at < body.len() {
        pending -= 1;
        let marker = Marker::from_u8(body[at]);
        at += 1;
        let (skip, heap, elements) = match marker {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, None, 0)
            }
            Marker::U8 | Marker::I8 => (1, None, 0),
            Marker::U16 | Marker::I16 => (2, None, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, None, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, None, 0),
            Marker::FixStr(n) => (n as usize, Some(n as usize), 0),
            Marker::Str8 | Marker::Bin8 => {
                let n = be(at, 1);
                at += 1;
                (n, Some(n), 0)
            }
            Marker::Str16 | Marker::Bin16 => {
                let n = be(at, 2);
                at += 2;
                (n, Some(n), 0)
            }
            Marker::Str32 | Marker::Bin32 => {
                let n = be(at, 4);
                at += 4;
                (n, Some(n), 0)
            }
            Marker::FixArray(n) => (0, Some(0), n as u64),
            Marker::Array16 => {
                at += 2;
                (0, Some(0), be(at - 2, 2) as u64)
            }
            Marker::Array32 => {
                at += 4;
                (0, Some(0), be(at - 4, 4) as u64)
            }
            Marker::FixMap(n) => (0, Some(0), 2 * n as u64),
            Marker::Map16 => {
                at += 2;
                (0, Some(0), 2 * be(at - 2, 2) as u64)
            }
            Marker::Map32 => {
                at += 4;
                (0, Some(0), 2 * be(at - 4, 4) as u64)
            }
            Marker::FixExt1 => (2, None, 0),
            Marker::FixExt2 => (3, None, 0),
            Marker::FixExt4 => (5, None, 0),
            Marker::FixExt8 => (9, None, 0),
            Marker::FixExt16 => (17, None, 0),
            Marker::Ext8 => {
                at += 1;
                (1 + be(at - 1, 1), None, 0)
            }
            Marker::Ext16 => {
                at += 2;
                (1 + be(at - 2, 2), None, 0)
            }
            Marker::Ext32 => {
                at += 4;
                (1 + be(at - 4, 4), None, 0)
            }
            Marker::Reserved => break,
        };
        at = at.saturating_add(skip);
        pending = pending.saturating_add(elements);
        total = total.saturating_add(match heap {
            // A scalar, in place.
            None => 8,
            // A string's bytes, or an array's or map's block of
            // elements (the elements themselves counted as they come).
            Some(n) => block(n).saturating_add(if elements > 0 { 40 } else { 24 }),
        });
    }
    total
}

/// A hasher for oids: one multiplication (the cache's lookups are the
/// hot path of reads; SipHash's resistance to chosen keys buys nothing for
/// oids a store handed out).
#[derive(Default)]
struct OidHasher(u64);

impl std::hash::Hasher for OidHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

type OidMap<V> = HashMap<Oid, V, std::hash::BuildHasherDefault<OidHasher>>;
type OidSet = HashSet<Oid, std::hash::BuildHasherDefault<OidHasher>>;

/// One cached object.
struct Cached {
    value: Arc<dyn Any + Send + Sync>,
    /// Its type's tag.
    tag: &'static str,
    bytes: usize,
    /// When it was last used.
    tick: u64,
    /// Its key in the order of use (`tick` as of its last listing).
    listed: u64,
    /// The transaction (`Cache::serial`) that read it last.
    read_in: u64,
}

/// Decoded objects, bounded by the size of their records, the least
/// recently used given up first. Only committed (clean) objects are here:
/// a transaction's changes stay in the transaction until its commit.
struct Cache {
    objects: OidMap<Cached>,
    /// Each object once, by `listed`: the least recently listed first.
    by_use: BTreeMap<u64, Oid>,
    bytes: usize,
    limit: usize,
    tick: u64,
    /// The running transaction's number.
    serial: u64,
}

/// A cached object, and whether the running transaction reads it for the
/// first time.
type Hit = (Arc<dyn Any + Send + Sync>, &'static str, bool);

impl Cache {
    /// A cached object. Its use is noted by its tick alone: the order of
    /// use is brought up to date when something must be evicted.
    fn get(&mut self, oid: Oid) -> Option<Hit> {
        let c = self.objects.get_mut(&oid)?;
        self.tick += 1;
        c.tick = self.tick;
        let first = c.read_in != self.serial;
        c.read_in = self.serial;
        Some((c.value.clone(), c.tag, first))
    }

    fn put(
        &mut self,
        oid: Oid,
        value: Arc<dyn Any + Send + Sync>,
        tag: &'static str,
        bytes: usize,
    ) {
        self.remove(oid);
        self.tick += 1;
        self.objects.insert(
            oid,
            Cached {
                value,
                tag,
                bytes,
                tick: self.tick,
                listed: self.tick,
                read_in: self.serial,
            },
        );
        self.by_use.insert(self.tick, oid);
        self.bytes += bytes;
        while self.bytes > self.limit {
            let Some((listed, oldest)) = self.by_use.pop_first() else {
                break;
            };
            let Some(c) = self.objects.get_mut(&oldest) else {
                continue;
            };
            if c.tick != listed {
                // Used since it was listed: listed again, as of that use.
                c.listed = c.tick;
                self.by_use.insert(c.tick, oldest);
                continue;
            }
            let c = self.objects.remove(&oldest).expect("just found");
            self.bytes -= c.bytes;
        }
    }

    fn remove(&mut self, oid: Oid) {
        if let Some(c) = self.objects.remove(&oid) {
            self.by_use.remove(&c.listed);
            self.bytes -= c.bytes;
        }
    }
}

/// Objects over one storage session: a [`RedbStorage`](crate::RedbStorage)
/// in this process, a [`ClientStorage`](crate::ClientStorage) of a server,
/// or any other [`Storage`]. Each `Db` is one session with its own cache;
/// several threads or processes each use their own.
pub struct Db<S: Storage> {
    storage: S,
    cache: Cache,
    tries: u32,
    /// This session was handed the root (oid 0) by `new_oid` and has not
    /// stored it yet: it alone may.
    holds_root: bool,
}

/// The default bound of a [`Db`]'s cache: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// How often a transaction runs at most by default.
pub const DEFAULT_TRIES: u32 = 10;

impl<S: Storage> Db<S> {
    /// Objects over `storage`, with a cache of [`DEFAULT_CACHE_BYTES`].
    pub fn new(storage: S) -> Db<S> {
        Db::with_cache(storage, DEFAULT_CACHE_BYTES)
    }

    /// Objects over `storage`, caching objects that hold at most about
    /// `bytes` of memory (each estimated from its record: its scalars,
    /// strings and collections, and the cache's own cost of keeping it).
    pub fn with_cache(storage: S, bytes: usize) -> Db<S> {
        Db {
            storage,
            cache: Cache {
                objects: OidMap::default(),
                by_use: BTreeMap::new(),
                bytes: 0,
                limit: bytes,
                tick: 0,
                serial: 0,
            },
            tries: DEFAULT_TRIES,
            holds_root: false,
        }
    }

    /// How often a transaction runs at most before
    /// [`ObjectError::TooManyConflicts`] (at least once).
    pub fn set_tries(&mut self, tries: u32) {
        self.tries = tries.max(1);
    }

    /// The storage under it.
    pub fn storage(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The bytes the cache holds now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes
    }

    /// Takes in what other sessions committed: cached copies of what they
    /// changed are dropped.
    pub fn sync(&mut self) -> Result<(), ObjectError> {
        for oid in self.storage.sync()? {
            self.cache.remove(oid);
        }
        Ok(())
    }

    /// Runs `f` in a transaction and commits what it changed. On a
    /// conflict (another session changed what it read or wrote) it syncs
    /// and runs `f` again, at most the tries set (default
    /// [`DEFAULT_TRIES`]); an error of `f` itself, or of the storage,
    /// ends it at once with nothing committed. A transaction that changed
    /// nothing commits nothing.
    pub fn transact<R>(
        &mut self,
        mut f: impl FnMut(&mut Tx<'_, S>) -> Result<R, ObjectError>,
    ) -> Result<R, ObjectError> {
        let mut last = None;
        for try_ in 0..self.tries {
            if try_ > 0 {
                // A moment for the other session to finish (its root, its
                // commit), longer as the conflicts go on.
                std::thread::sleep(std::time::Duration::from_millis(u64::from(try_.min(50))));
            }
            self.sync()?;
            self.cache.serial += 1;
            let mut tx = Tx {
                db: self,
                writes: BTreeMap::new(),
                reads: Vec::new(),
            };
            let result = f(&mut tx);
            let writes = std::mem::take(&mut tx.writes);
            let reads = std::mem::take(&mut tx.reads);
            let conflict = match result {
                Ok(r) => match self.commit(writes, reads) {
                    Ok(()) => return Ok(r),
                    Err(ObjectError::Storage(e)) if retryable(&e) => e,
                    Err(e) => return Err(e),
                },
                Err(ObjectError::Storage(e)) if retryable(&e) => e,
                Err(e) => return Err(e),
            };
            last = Some(conflict);
        }
        Err(ObjectError::TooManyConflicts {
            tries: self.tries,
            last: last.expect("at least one try"),
        })
    }

    /// Commits a transaction's changes, only onto the state it read: the
    /// storage refuses the commit if another session changed what it read
    /// or wrote since this session's sync. A transaction that changed
    /// nothing commits nothing, but is checked the same way (unless the
    /// storage reads from snapshots, where what it read is consistent).
    fn commit(
        &mut self,
        writes: BTreeMap<Oid, Staged>,
        reads: Vec<Oid>,
    ) -> Result<(), ObjectError> {
        if writes.is_empty() {
            if reads.is_empty() || self.storage.snapshot_reads() {
                return Ok(());
            }
            let changed = self.storage.sync()?;
            if changed.is_empty() {
                return Ok(());
            }
            let reads: OidSet = reads.into_iter().collect();
            let mut clash = Vec::new();
            for oid in changed {
                self.cache.remove(oid);
                if reads.contains(&oid) {
                    clash.push(oid);
                }
            }
            if clash.is_empty() {
                return Ok(());
            }
            return Err(StorageError::Conflict(Conflict::Invalidated { oids: clash }).into());
        }
        let mut sizes = Vec::with_capacity(writes.len());
        self.storage.begin();
        let stored = (|| {
            for (oid, w) in &writes {
                let (data, refs) = (w.encode)(*oid, &*w.value)?;
                sizes.push(footprint(&data, w.inline));
                self.storage
                    .store(*oid, Record::new(*oid, &data, &refs).into_bytes())?;
            }
            self.storage.end_checked(&reads).map_err(ObjectError::from)
        })();
        if let Err(e) = stored {
            self.storage.abort();
            for oid in writes.keys() {
                self.cache.remove(*oid);
            }
            return Err(e);
        }
        if writes.contains_key(&Oid::ROOT) {
            self.holds_root = false;
        }
        // Written back: what was committed is what later reads find.
        for ((oid, w), bytes) in writes.into_iter().zip(sizes) {
            self.cache.put(oid, w.value, w.tag, bytes);
        }
        Ok(())
    }
}

/// Encodes a staged value of type `T`.
type Encoder = fn(Oid, &(dyn Any + Send + Sync)) -> Result<(Vec<u8>, Vec<Oid>), ObjectError>;

fn encode_any<T: Persistent>(
    oid: Oid,
    value: &(dyn Any + Send + Sync),
) -> Result<(Vec<u8>, Vec<Oid>), ObjectError> {
    let value = value
        .downcast_ref::<T>()
        .expect("a staged value is of the type it was staged as");
    encode(oid, value)
}

/// A change of a transaction, not yet committed: encoded once, at commit,
/// however often the transaction changed it.
struct Staged {
    value: Arc<dyn Any + Send + Sync>,
    tag: &'static str,
    encode: Encoder,
    /// The value's own size.
    inline: usize,
}

/// A transaction of [`Db::transact`]: reads through the cache, and keeps
/// its changes until it commits.
pub struct Tx<'a, S: Storage> {
    db: &'a mut Db<S>,
    writes: BTreeMap<Oid, Staged>,
    /// What it read (from the cache or the storage), each oid once (or
    /// again if evicted and read again): it commits only if no other
    /// session changed these meanwhile.
    reads: Vec<Oid>,
}

impl<S: Storage> Tx<'_, S> {
    /// A cached object, noted as read.
    fn read(&mut self, oid: Oid) -> Option<(Arc<dyn Any + Send + Sync>, &'static str)> {
        let (value, tag, first) = self.db.cache.get(oid)?;
        if first {
            self.reads.push(oid);
        }
        Some((value, tag))
    }

    /// The object `r` refers to (as this transaction changed it, if it did).
    pub fn get<T: Persistent>(&mut self, r: Ref<T>) -> Result<Arc<T>, ObjectError> {
        let oid = r.oid;
        let (any, tag) = match self.writes.get(&oid) {
            Some(w) => (w.value.clone(), w.tag),
            None => match self.read(oid) {
                Some(v) => v,
                None => {
                    self.reads.push(oid);
                    let record = self.db.storage.load(oid)?;
                    let value: Arc<dyn Any + Send + Sync> =
                        Arc::new(decode::<T>(oid, record.data())?);
                    let bytes = footprint(record.data(), std::mem::size_of::<T>());
                    self.db.cache.put(oid, value.clone(), T::TAG, bytes);
                    (value, T::TAG)
                }
            },
        };
        any.downcast::<T>().map_err(|_| ObjectError::WrongType {
            oid,
            expected: T::TAG,
            found: tag.to_string(),
        })
    }

    /// Stores `value` as the object `r` refers to, when the transaction
    /// commits (it is encoded then: an error of its encoding fails the
    /// commit).
    pub fn put<T: Persistent>(&mut self, r: Ref<T>, value: T) -> Result<(), ObjectError> {
        self.writes.insert(
            r.oid,
            Staged {
                value: Arc::new(value),
                tag: T::TAG,
                encode: encode_any::<T>,
                inline: std::mem::size_of::<T>(),
            },
        );
        Ok(())
    }

    /// The object `r` refers to, owned, to be changed and [`put`](Self::put)
    /// back: a value this transaction already changed is taken without a
    /// copy (it is staged no more until put back).
    pub fn take<T: Persistent + Clone>(&mut self, r: Ref<T>) -> Result<T, ObjectError> {
        if let Some(w) = self.writes.remove(&r.oid) {
            match w.value.clone().downcast::<T>() {
                Ok(v) => {
                    drop(w);
                    return Ok(Arc::try_unwrap(v).unwrap_or_else(|v| (*v).clone()));
                }
                Err(_) => {
                    let found = w.tag.to_string();
                    self.writes.insert(r.oid, w);
                    return Err(ObjectError::WrongType {
                        oid: r.oid,
                        expected: T::TAG,
                        found,
                    });
                }
            }
        }
        let value = self.get(r)?;
        // Out of the cache while this transaction changes it: the copy
        // here is then the only one, taken without a clone (its commit
        // puts the new value back; if it does not commit, a later read
        // loads it again).
        self.db.cache.remove(r.oid);
        Ok(Arc::try_unwrap(value).unwrap_or_else(|v| (*v).clone()))
    }

    /// Changes the object `r` refers to with `change`.
    pub fn update<T: Persistent + Clone>(
        &mut self,
        r: Ref<T>,
        change: impl FnOnce(&mut T),
    ) -> Result<(), ObjectError> {
        let mut value = self.take(r)?;
        change(&mut value);
        self.put(r, value)
    }

    /// A new object holding `value`, stored when the transaction commits.
    pub fn insert<T: Persistent>(&mut self, value: T) -> Result<Ref<T>, ObjectError> {
        let mut oid = self.db.storage.new_oid()?;
        if oid == Oid::ROOT {
            // A store without a root hands out the root first: it is kept
            // for `set_root`.
            self.db.holds_root = true;
            oid = self.db.storage.new_oid()?;
        }
        let r = Ref::from_oid(oid);
        self.put(r, value)?;
        Ok(r)
    }

    /// The root object, if one is stored.
    pub fn root<T: Persistent>(&mut self) -> Result<Option<Arc<T>>, ObjectError> {
        match self.get(Ref::<T>::from_oid(Oid::ROOT)) {
            Ok(v) => Ok(Some(v)),
            Err(ObjectError::Storage(StorageError::NotFound(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `value` the root object (what everything live is reachable
    /// from). On a store without a root, the first session to be handed
    /// the root creates it: another one's transaction meets a conflict,
    /// runs again and finds the root made.
    pub fn set_root<T: Persistent>(&mut self, value: T) -> Result<(), ObjectError> {
        let known = self.db.holds_root
            || self.writes.contains_key(&Oid::ROOT)
            || self.db.cache.objects.contains_key(&Oid::ROOT);
        if !known {
            match self.db.storage.load(Oid::ROOT) {
                Ok(_) => {}
                Err(StorageError::NotFound(_)) => {
                    if self.db.storage.new_oid()? != Oid::ROOT {
                        // Another session was handed the root: it makes it.
                        return Err(StorageError::ReadConflict(Oid::ROOT).into());
                    }
                    self.db.holds_root = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.put(Ref::from_oid(Oid::ROOT), value)
    }
}

pub use self::map::{PMap, PSet};

mod map {
    //! A persistent ordered map: a B-tree whose nodes are objects.

    use std::ops::{Bound, RangeBounds};

    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize};

    use super::{ObjectError, Persistent, Ref, Tx};
    use crate::storage::Storage;

    /// What a map's keys and values must be.
    pub trait Entry: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
    impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Entry for T {}

    /// The map's own object: where its tree starts, and its size.
    #[derive(Clone, Serialize, Deserialize)]
    #[serde(bound = "")]
    struct Header<K: Entry, V: Entry> {
        root: Ref<Node<K, V>>,
        len: u64,
        /// The most entries (or children) a node holds before it splits.
        fanout: u32,
    }

    impl<K: Entry, V: Entry> Persistent for Header<K, V> {
        const TAG: &'static str = "durus_redb.PMap";
    }

    /// A node of the tree.
    #[derive(Clone, Serialize, Deserialize)]
    #[serde(bound = "")]
    enum Node<K: Entry, V: Entry> {
        /// Entries, in key order.
        Leaf { keys: Vec<K>, values: Vec<V> },
        /// `children[i]` holds the keys below `keys[i]` (and at or above
        /// `keys[i - 1]`); one more child than keys.
        Branch {
            keys: Vec<K>,
            children: Vec<Ref<Node<K, V>>>,
        },
    }

    impl<K: Entry, V: Entry> Persistent for Node<K, V> {
        const TAG: &'static str = "durus_redb.PMapNode";
    }

    /// A persistent ordered map from `K` to `V`, for maps far larger than
    /// memory: a B-tree whose nodes are objects, so a lookup loads the
    /// nodes on its path (through the cache) and an iteration one node at
    /// a time. The handle is a reference: store it in your objects (it is
    /// serde-serializable and counts as a reference) and use it in any
    /// transaction. Removing leaves nodes as they are (no merging): a map
    /// that shrinks a lot keeps its nodes until rebuilt.
    #[derive(Serialize, Deserialize)]
    #[serde(bound = "")]
    pub struct PMap<K: Entry + Ord, V: Entry> {
        header: Ref<Header<K, V>>,
    }

    impl<K: Entry + Ord, V: Entry> Clone for PMap<K, V> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<K: Entry + Ord, V: Entry> Copy for PMap<K, V> {}
    impl<K: Entry + Ord, V: Entry> std::fmt::Debug for PMap<K, V> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "PMap({})", self.header.oid())
        }
    }

    /// Entries or children a node holds at most, by default.
    pub const DEFAULT_FANOUT: u32 = 128;

    enum Inserted<K: Entry, V: Entry> {
        Done(Option<V>),
        Split(Option<V>, K, Ref<Node<K, V>>),
    }

    impl<K: Entry + Ord, V: Entry> PMap<K, V> {
        /// A new, empty map.
        pub fn new<S: Storage>(tx: &mut Tx<'_, S>) -> Result<PMap<K, V>, ObjectError> {
            PMap::with_fanout(tx, DEFAULT_FANOUT)
        }

        /// A new, empty map whose nodes split above `fanout` entries (at
        /// least 4).
        pub fn with_fanout<S: Storage>(
            tx: &mut Tx<'_, S>,
            fanout: u32,
        ) -> Result<PMap<K, V>, ObjectError> {
            let root = tx.insert(Node::<K, V>::Leaf {
                keys: Vec::new(),
                values: Vec::new(),
            })?;
            let header = tx.insert(Header {
                root,
                len: 0,
                fanout: fanout.max(4),
            })?;
            Ok(PMap { header })
        }

        /// How many entries it holds.
        pub fn len<S: Storage>(&self, tx: &mut Tx<'_, S>) -> Result<u64, ObjectError> {
            Ok(tx.get(self.header)?.len)
        }

        /// Whether it holds no entry.
        pub fn is_empty<S: Storage>(&self, tx: &mut Tx<'_, S>) -> Result<bool, ObjectError> {
            Ok(self.len(tx)? == 0)
        }

        /// The value of `key` (a copy: [`get_with`](Self::get_with) reads
        /// it in place).
        pub fn get<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            key: &K,
        ) -> Result<Option<V>, ObjectError> {
            self.get_with(tx, key, V::clone)
        }

        /// Whether it holds `key`.
        pub fn contains_key<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            key: &K,
        ) -> Result<bool, ObjectError> {
            Ok(self.get_with(tx, key, |_| ())?.is_some())
        }

        /// `read` of the value of `key`, in place (no copy of the value).
        pub fn get_with<S: Storage, R>(
            &self,
            tx: &mut Tx<'_, S>,
            key: &K,
            read: impl FnOnce(&V) -> R,
        ) -> Result<Option<R>, ObjectError> {
            let mut at = tx.get(self.header)?.root;
            loop {
                let node = tx.get(at)?;
                match &*node {
                    Node::Leaf { keys, values } => {
                        return Ok(keys.binary_search(key).ok().map(|i| read(&values[i])));
                    }
                    Node::Branch { keys, children } => {
                        at = children[keys.partition_point(|k| k <= key)];
                    }
                }
            }
        }

        /// Sets `key` to `value`; returns the value it had.
        pub fn insert<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            key: K,
            value: V,
        ) -> Result<Option<V>, ObjectError> {
            let mut header = tx.take(self.header)?;
            let fanout = header.fanout as usize;
            let old = match insert_at(tx, header.root, key, value, fanout)? {
                Inserted::Done(old) => old,
                Inserted::Split(old, sep, right) => {
                    header.root = tx.insert(Node::Branch {
                        keys: vec![sep],
                        children: vec![header.root, right],
                    })?;
                    old
                }
            };
            if old.is_none() {
                header.len += 1;
            }
            tx.put(self.header, header)?;
            Ok(old)
        }

        /// Removes `key`; returns the value it had.
        pub fn remove<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            key: &K,
        ) -> Result<Option<V>, ObjectError> {
            let header = tx.get(self.header)?;
            let mut at = header.root;
            loop {
                let node = tx.get(at)?;
                match &*node {
                    Node::Leaf { keys, .. } => {
                        let Ok(i) = keys.binary_search(key) else {
                            return Ok(None);
                        };
                        let Node::Leaf {
                            mut keys,
                            mut values,
                        } = (*node).clone()
                        else {
                            unreachable!()
                        };
                        keys.remove(i);
                        let old = values.remove(i);
                        tx.put(at, Node::Leaf { keys, values })?;
                        let mut header = (*header).clone();
                        header.len -= 1;
                        tx.put(self.header, header)?;
                        return Ok(Some(old));
                    }
                    Node::Branch { keys, children } => {
                        at = children[keys.partition_point(|k| k <= key)];
                    }
                }
            }
        }

        /// Calls `each` with the entries whose keys are in `range`, in key
        /// order, until it returns false. Loads one node at a time.
        pub fn for_each_in<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            range: impl RangeBounds<K>,
            mut each: impl FnMut(&K, &V) -> bool,
        ) -> Result<(), ObjectError> {
            let root = tx.get(self.header)?.root;
            walk(tx, root, &range, &mut each).map(|_| ())
        }

        /// The entries whose keys are in `range`, in key order, at most
        /// `limit` of them.
        pub fn range<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            range: impl RangeBounds<K>,
            limit: usize,
        ) -> Result<Vec<(K, V)>, ObjectError> {
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            self.for_each_in(tx, range, |k, v| {
                out.push((k.clone(), v.clone()));
                out.len() < limit
            })?;
            Ok(out)
        }
    }

    /// A persistent ordered set: a [`PMap`] of keys to `()`, with the
    /// same scale (nodes loaded one at a time) and the same handle (a
    /// reference to store in your objects).
    #[derive(Serialize, Deserialize)]
    #[serde(bound = "")]
    pub struct PSet<K: Entry + Ord> {
        map: PMap<K, ()>,
    }

    impl<K: Entry + Ord> Clone for PSet<K> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<K: Entry + Ord> Copy for PSet<K> {}
    impl<K: Entry + Ord> std::fmt::Debug for PSet<K> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "PSet({})", self.map.header.oid())
        }
    }

    impl<K: Entry + Ord> PSet<K> {
        /// A new, empty set.
        pub fn new<S: Storage>(tx: &mut Tx<'_, S>) -> Result<PSet<K>, ObjectError> {
            Ok(PSet {
                map: PMap::new(tx)?,
            })
        }

        /// A new, empty set whose nodes split above `fanout` keys (at
        /// least 4).
        pub fn with_fanout<S: Storage>(
            tx: &mut Tx<'_, S>,
            fanout: u32,
        ) -> Result<PSet<K>, ObjectError> {
            Ok(PSet {
                map: PMap::with_fanout(tx, fanout)?,
            })
        }

        /// How many keys it holds.
        pub fn len<S: Storage>(&self, tx: &mut Tx<'_, S>) -> Result<u64, ObjectError> {
            self.map.len(tx)
        }

        /// Whether it holds no key.
        pub fn is_empty<S: Storage>(&self, tx: &mut Tx<'_, S>) -> Result<bool, ObjectError> {
            self.map.is_empty(tx)
        }

        /// Whether it holds `key`.
        pub fn contains<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            key: &K,
        ) -> Result<bool, ObjectError> {
            self.map.contains_key(tx, key)
        }

        /// Adds `key`; true if it was not there.
        pub fn insert<S: Storage>(&self, tx: &mut Tx<'_, S>, key: K) -> Result<bool, ObjectError> {
            Ok(self.map.insert(tx, key, ())?.is_none())
        }

        /// Removes `key`; true if it was there.
        pub fn remove<S: Storage>(&self, tx: &mut Tx<'_, S>, key: &K) -> Result<bool, ObjectError> {
            Ok(self.map.remove(tx, key)?.is_some())
        }

        /// Calls `each` with the keys in `range`, in order, until it
        /// returns false. Loads one node at a time.
        pub fn for_each_in<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            range: impl RangeBounds<K>,
            mut each: impl FnMut(&K) -> bool,
        ) -> Result<(), ObjectError> {
            self.map.for_each_in(tx, range, |k, _| each(k))
        }

        /// The keys in `range`, in order, at most `limit` of them.
        pub fn range<S: Storage>(
            &self,
            tx: &mut Tx<'_, S>,
            range: impl RangeBounds<K>,
            limit: usize,
        ) -> Result<Vec<K>, ObjectError> {
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            self.for_each_in(tx, range, |k| {
                out.push(k.clone());
                out.len() < limit
            })?;
            Ok(out)
        }
    }

    fn insert_at<S: Storage, K: Entry + Ord, V: Entry>(
        tx: &mut Tx<'_, S>,
        at: Ref<Node<K, V>>,
        key: K,
        value: V,
        fanout: usize,
    ) -> Result<Inserted<K, V>, ObjectError> {
        let node = tx.get(at)?;
        if let Node::Branch { keys, children } = &*node {
            // The branch changes only if its child splits.
            let i = keys.partition_point(|k| k <= &key);
            let child = children[i];
            drop(node);
            return match insert_at(tx, child, key, value, fanout)? {
                Inserted::Done(old) => Ok(Inserted::Done(old)),
                Inserted::Split(old, sep, right) => {
                    let Node::Branch {
                        mut keys,
                        mut children,
                    } = tx.take(at)?
                    else {
                        unreachable!("a branch stays a branch")
                    };
                    keys.insert(i, sep);
                    children.insert(i + 1, right);
                    if children.len() <= fanout {
                        tx.put(at, Node::Branch { keys, children })?;
                        return Ok(Inserted::Done(old));
                    }
                    let mid = keys.len() / 2;
                    let mut right_keys = keys.split_off(mid);
                    let up = right_keys.remove(0);
                    let right_children = children.split_off(mid + 1);
                    tx.put(at, Node::Branch { keys, children })?;
                    let right = tx.insert(Node::Branch {
                        keys: right_keys,
                        children: right_children,
                    })?;
                    Ok(Inserted::Split(old, up, right))
                }
            };
        }
        drop(node);
        let Node::Leaf {
            mut keys,
            mut values,
        } = tx.take(at)?
        else {
            unreachable!("checked above")
        };
        let old = match keys.binary_search(&key) {
            Ok(i) => Some(std::mem::replace(&mut values[i], value)),
            Err(i) => {
                keys.insert(i, key);
                values.insert(i, value);
                None
            }
        };
        if keys.len() <= fanout {
            tx.put(at, Node::Leaf { keys, values })?;
            return Ok(Inserted::Done(old));
        }
        let mid = keys.len() / 2;
        let right_keys = keys.split_off(mid);
        let right_values = values.split_off(mid);
        let sep = right_keys[0].clone();
        tx.put(at, Node::Leaf { keys, values })?;
        let right = tx.insert(Node::Leaf {
            keys: right_keys,
            values: right_values,
        })?;
        Ok(Inserted::Split(old, sep, right))
    }

    /// Whether `k` lies after the end of `range`.
    fn past_end<K: Ord>(k: &K, range: &impl RangeBounds<K>) -> bool {
        match range.end_bound() {
            Bound::Included(e) => k > e,
            Bound::Excluded(e) => k >= e,
            Bound::Unbounded => false,
        }
    }

    /// Visits the entries of `range` under `at`; false once `each` said stop.
    fn walk<S: Storage, K: Entry + Ord, V: Entry>(
        tx: &mut Tx<'_, S>,
        at: Ref<Node<K, V>>,
        range: &impl RangeBounds<K>,
        each: &mut impl FnMut(&K, &V) -> bool,
    ) -> Result<bool, ObjectError> {
        let node = tx.get(at)?;
        match &*node {
            Node::Leaf { keys, values } => {
                for (k, v) in keys.iter().zip(values) {
                    if !range.contains(k) {
                        if past_end(k, range) {
                            return Ok(false);
                        }
                        continue;
                    }
                    if !each(k, v) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Node::Branch { keys, children } => {
                // The children that may hold keys of the range.
                let first = match range.start_bound() {
                    Bound::Included(s) | Bound::Excluded(s) => keys.partition_point(|k| k <= s),
                    Bound::Unbounded => 0,
                };
                for (i, child) in children.iter().enumerate().skip(first) {
                    if i > 0 && past_end(&keys[i - 1], range) {
                        return Ok(false);
                    }
                    if !walk(tx, *child, range, each)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Cache, Oid, footprint};

    #[test]
    fn a_records_footprint_is_near_what_its_value_holds_in_memory() {
        #[derive(serde::Serialize)]
        struct Leaf {
            keys: Vec<u64>,
            values: Vec<String>,
        }
        let leaf = Leaf {
            keys: (0..10_000u64).map(|k| k << 40).collect(),
            values: (0..10_000).map(|k| format!("value {k:07}")).collect(),
        };
        let data = rmp_serde::to_vec_named(&leaf).unwrap();
        let got = footprint(&data, std::mem::size_of::<Leaf>());
        // 8 bytes a key; a string's header (24) and its 13 bytes' block
        // (32) a value: 640,000 in all, and a little for the headers.
        assert!((640_000..660_000).contains(&got), "{got}");
        // Far more than the record: the strings' headers and blocks.
        assert!(got > 2 * data.len());
        // With the tag in front, as records have it: the same.
        let mut tagged = super::MARKER.to_vec();
        tagged.extend_from_slice(&4u16.to_be_bytes());
        tagged.extend_from_slice(b"Leaf");
        tagged.extend_from_slice(&data);
        assert_eq!(footprint(&tagged, std::mem::size_of::<Leaf>()), got);
        // Cut or garbage bodies end the count; they do not panic.
        for cut in [0, 1, 5, data.len() / 2] {
            assert!(footprint(&data[..cut], 0) <= got);
        }
        assert!(footprint(&[0xc1, 0xdd, 0xff, 0xff, 0xff, 0xff], 0) < 1_000);
    }
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn the_cache_gives_up_the_least_recently_used_first_and_stays_in_its_bound() {
        let mut c = Cache {
            objects: super::OidMap::default(),
            by_use: BTreeMap::new(),
            bytes: 0,
            limit: 30,
            tick: 0,
            serial: 0,
        };
        for oid in 1..=3 {
            c.put(Oid(oid), Arc::new(oid), "t", 10);
        }
        assert!(c.get(Oid(1)).is_some());
        c.put(Oid(4), Arc::new(4u64), "t", 10);
        // 2 was used least recently: it went, 1 (used since) stayed.
        assert!(c.get(Oid(2)).is_none());
        for oid in [1, 3, 4] {
            assert!(c.get(Oid(oid)).is_some(), "{oid}");
        }
        assert_eq!(c.bytes, 30);
        // Used in the order 1, 3, 4 above; 1 is now the oldest again.
        c.put(Oid(5), Arc::new(5u64), "t", 10);
        assert!(c.get(Oid(1)).is_none());
        // Replacing keeps one copy; removing frees its bytes.
        c.put(Oid(5), Arc::new(6u64), "t", 10);
        assert_eq!(c.bytes, 30);
        c.remove(Oid(5));
        assert_eq!(c.bytes, 20);
        assert_eq!(c.by_use.len(), c.objects.len());
    }
}
