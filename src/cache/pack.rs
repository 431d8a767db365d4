//! Pack store: small verified blobs in append-only pack files, so caching a batch costs one write.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};

/// Largest blob a pack holds.
pub const MAX_BLOB: u64 = 1 << 20;

const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CFSB");
const IDX_MAGIC: u32 = u32::from_le_bytes(*b"CFSI");
/// Bytes before a record's data: magic, size, hash.
const HEADER: usize = 40;
/// Bytes before an index's entries (magic, entry count, pack length), and per entry (hash, size, offset).
const IDX_HEADER: usize = 16;
const IDX_ENTRY: usize = 40;
/// Read handles kept at most; past that, all are closed and reopened on demand.
const MAX_OPEN: usize = 256;

/// Index key: the first 128 bits of the hash, so an entry takes 28 bytes (reads check the whole hash).
type Key = [u8; 16];
/// A record as a scan or an index finds it: hash, size, offset.
type Entry = ([u8; 32], u32, u32);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u32,
    size: u32,
}

struct Pack {
    seq: u64,
    stem: String,
    bytes: u64,
    /// Has its index; only sealed packs are evicted (so never a live writer's).
    sealed: bool,
    file: Option<Arc<File>>,
}

#[derive(Default)]
struct State {
    index: HashMap<Key, Loc>,
    packs: HashMap<u32, Pack>,
    /// (seq, id) of every pack, oldest first; those below `cutoff` are the older half.
    order: BTreeSet<(u64, u32)>,
    cutoff: (u64, u32),
    total: u64,
    next_id: u32,
    /// Blobs read from the older half, written again by the next append.
    requeue: HashMap<Key, (Digest, Bytes)>,
    requeue_bytes: u64,
}

/// This store's pack being appended to, locked while the `File` lives.
struct Active {
    id: u32,
    stem: String,
    file: File,
    len: u64,
}

/// A blob cache of append-only pack files in one folder, bounded by deleting the oldest packs.
///
/// Files: `{seq:010}-{pid}-{nonce:08x}.pack`, records of magic u32 LE, size u32 LE, 32-byte
/// hash and data; `<stem>.idx` once sealed (magic, count, pack length, then hash/size/offset
/// per record). A store appends only to its own active pack, holding `flock(LOCK_EX)` on it
/// until it seals it; an unlocked pack without index is a dead writer's, recovered at open
/// (cut at its first torn record, then sealed). Nothing is fsynced: a crash costs a tail.
/// Blobs read from the older half of the packs are copied forward by the next append, so the
/// bound evicts like an LRU. Other stores, in this process or others, may share the folder.
pub struct PackStore {
    dir: PathBuf,
    max_bytes: u64,
    pack_size: u64,
    state: Mutex<State>,
    writer: Mutex<Option<Active>>,
}

impl PackStore {
    /// Opens (creating) the store in `dir`, bounded to `max_bytes` of pack files (0 = unbounded).
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let names = list(&dir)?;
        let mut packs: Vec<(u64, &str)> =
            names.iter().filter_map(|n| n.strip_suffix(".pack").and_then(|s| Some((parse_stem(s)?, s)))).collect();
        packs.sort_unstable();
        let mut st = State::default();
        for (seq, stem) in packs {
            match load_pack(&dir, stem, names.contains(&format!("{stem}.idx"))) {
                Ok(Some((len, sealed, entries))) => {
                    let pack = st.add_pack(seq, stem, len, sealed);
                    st.index.reserve(entries.len());
                    for (hash, size, offset) in entries {
                        st.index.insert(key(&hash), Loc { pack, offset, size });
                    }
                }
                Ok(None) => tracing::debug!(pack = stem, "removed a pack with no record"),
                Err(e) => tracing::warn!(pack = stem, error = %e, "skipping an unreadable pack"),
            }
        }
        names.iter().for_each(|name| clean_stray(&dir, name));
        let pack_size = if max_bytes == 0 { 64 << 20 } else { (max_bytes / 16).clamp(1 << 20, 64 << 20) };
        let store = PackStore { dir, max_bytes, pack_size, state: Mutex::new(st), writer: Mutex::new(None) };
        store.evict();
        Ok(store)
    }

    /// True when the blob is held (the empty blob always is).
    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || lock(&self.state).find(digest).is_some()
    }

    /// The blob's bytes, checked against its digest; Ok(None) when absent, or when the
    /// stored bytes turn out wrong (then the entry is dropped and a warning naming the
    /// digest is logged with `tracing::warn!`, so the caller fetches it again).
    pub fn read(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let (loc, file, stem, old) = {
            let st = lock(&self.state);
            let Some((loc, p)) = st.find(digest) else { return Ok(None) };
            (loc, p.file.clone(), p.stem.clone(), (p.seq, loc.pack) < st.cutoff)
        };
        let path = named(&self.dir, &stem, "pack");
        let file = match file.map(Ok).unwrap_or_else(|| File::open(&path).map(|f| self.keep_open(loc.pack, f))) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tracing::debug!(pack = %stem, "pack deleted by another store; dropping its entries");
                lock(&self.state).remove_pack(loc.pack);
                return Ok(None);
            }
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let mut buf = vec![0u8; HEADER + loc.size as usize];
        let bad = match file.read_exact_at(&mut buf, u64::from(loc.offset)) {
            Ok(()) => {
                le32(&buf, 0) != RECORD_MAGIC
                    || buf[8..HEADER] != digest.hash_bytes()[..]
                    || crate::cas::verify(digest, &buf[HEADER..]).is_err()
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(Error::io(format!("reading {digest} from {}", path.display()), e)),
        };
        let k = key(digest.hash_bytes());
        let mut st = lock(&self.state);
        if bad {
            tracing::warn!(digest = %digest, pack = %stem, "cached blob is corrupt; dropping it");
            if st.index.get(&k) == Some(&loc) {
                st.index.remove(&k);
            }
            return Ok(None);
        }
        let data = Bytes::from(buf).slice(HEADER..);
        let room = st.requeue_bytes + digest.size() <= self.pack_size;
        if old && self.max_bytes != 0 && room && !st.requeue.contains_key(&k) {
            st.requeue_bytes += digest.size();
            st.requeue.insert(k, (*digest, data.clone()));
        }
        Ok(Some(data))
    }

    /// Appends blobs whose bytes the caller has already verified against their digests
    /// (blocking). Already-held blobs and the empty blob are skipped; a blob larger than
    /// MAX_BLOB or whose length differs from digest.size() is an Error::Internal and nothing
    /// of that call is written.
    pub fn append_verified(&self, blobs: &[(Digest, Bytes)]) -> Result<()> {
        if let Some((d, data)) = blobs.iter().find(|(d, data)| d.size() > MAX_BLOB || data.len() as u64 != d.size()) {
            let n = data.len();
            let why = format!("cannot pack {d}: {n} bytes given (packs take the digest's size, at most {MAX_BLOB})");
            return Err(Error::Internal(why));
        }
        let mut w = lock(&self.writer);
        let todo: Vec<(Digest, Bytes)> = {
            let mut st = lock(&self.state);
            let mut seen = HashSet::new();
            let fresh: Vec<_> = blobs
                .iter()
                .filter(|(d, _)| !d.is_empty_blob() && is_sha256(d) && st.find(d).is_none() && seen.insert(*d))
                .cloned()
                .collect();
            st.requeue_bytes = 0;
            let again = std::mem::take(&mut st.requeue).into_values().filter(|(d, _)| seen.insert(*d));
            fresh.into_iter().chain(again).collect()
        };
        let (mut buf, mut recs) = (Vec::new(), Vec::new());
        for (d, data) in &todo {
            let used = w.as_ref().map_or(0, |a| a.len) + buf.len() as u64;
            if used > 0 && used + (HEADER + data.len()) as u64 > self.pack_size {
                self.flush(&mut w, &mut buf, &mut recs)?;
                self.seal(&mut w);
            }
            recs.push((key(d.hash_bytes()), buf.len() as u64, data.len() as u32));
            buf.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(d.hash_bytes());
            buf.extend_from_slice(data);
        }
        self.flush(&mut w, &mut buf, &mut recs)?;
        self.evict();
        Ok(())
    }

    /// Bytes of pack files held (what the bound applies to).
    pub fn total_bytes(&self) -> u64 {
        lock(&self.state).total
    }

    /// Number of distinct blobs indexed.
    pub fn len(&self) -> usize {
        lock(&self.state).index.len()
    }

    /// True when no blob is indexed (the empty blob is held all the same).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `buf` (records at `recs` offsets in it) at the end of the active pack, starting one
    /// if there is none, and indexes the records.
    fn flush(&self, w: &mut Option<Active>, buf: &mut Vec<u8>, recs: &mut Vec<(Key, u64, u32)>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let a = match w {
            Some(a) => a,
            None => w.insert(self.start_pack()?),
        };
        let (written, n) = (a.file.write_all_at(buf, a.len), buf.len() as u64);
        buf.clear();
        if let Err(e) = written {
            recs.clear();
            // Cut off what got written of the batch (sealing cuts again in any case).
            let _ = a.file.set_len(a.len);
            return Err(Error::io(format!("appending to {}.pack", a.stem), e));
        }
        let base = a.len;
        a.len += n;
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        // Absent only when its file was deleted under us (a read then dropped the pack).
        if let Some(p) = st.packs.get_mut(&a.id) {
            p.bytes += n;
            st.total += n;
            for (k, off, size) in recs.drain(..) {
                st.index.insert(k, Loc { pack: a.id, offset: (base + off) as u32, size });
            }
        }
        recs.clear();
        Ok(())
    }

    /// Creates an active pack, locked before it gets its name, so that no opener takes it for a
    /// dead writer's.
    fn start_pack(&self) -> Result<Active> {
        let seq = list(&self.dir)?.iter().filter_map(|n| parse_stem(n.strip_suffix(".pack")?)).max().unwrap_or(0) + 1;
        for _ in 0..8 {
            let stem = format!("{seq:010}-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let (tmp, path) = (named(&self.dir, &stem, "pack.tmp"), named(&self.dir, &stem, "pack"));
            let mut opts = OpenOptions::new();
            let file = opts.read(true).write(true).create_new(true).open(&tmp).ctx(|| format!("creating {stem}"))?;
            // Another store's cleaning may take and remove the temporary file first; then try again.
            let linked = try_lock(&file).ctx(|| format!("locking {stem}"))?
                && match fs::hard_link(&tmp, &path) {
                    Ok(()) => true,
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::AlreadyExists) => false,
                    Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
                };
            let _ = fs::remove_file(&tmp);
            if linked {
                let id = lock(&self.state).add_pack(seq, &stem, 0, false);
                return Ok(Active { id, stem, file, len: 0 });
            }
        }
        Err(Error::Internal(format!("could not create a pack file in {}", self.dir.display())))
    }

    /// Seals the active pack (writes its index), then lets its lock go. An empty one is deleted.
    fn seal(&self, w: &mut Option<Active>) {
        let Some(a) = w.take() else { return };
        if a.len == 0 {
            remove_quietly(&named(&self.dir, &a.stem, "pack"));
            lock(&self.state).remove_pack(a.id);
            return;
        }
        let res = a.file.set_len(a.len).and_then(|()| scan(&a.file, a.len));
        match res.and_then(|(entries, _)| write_idx(&self.dir, &a.stem, &entries, a.len)) {
            Ok(()) => lock(&self.state).packs.get_mut(&a.id).into_iter().for_each(|p| p.sealed = true),
            Err(e) => tracing::warn!(pack = %a.stem, error = %e, "could not seal a pack; the next open will"),
        }
    }

    /// Keeps a read handle for a pack, first closing all of them when too many are open.
    fn keep_open(&self, id: u32, file: File) -> Arc<File> {
        let file = Arc::new(file);
        let mut st = lock(&self.state);
        if st.packs.values().filter(|p| p.file.is_some()).count() >= MAX_OPEN {
            st.packs.values_mut().for_each(|p| p.file = None);
        }
        if let Some(p) = st.packs.get_mut(&id) {
            p.file.get_or_insert_with(|| file.clone());
        }
        file
    }

    /// Deletes the oldest sealed packs (any store's) while over the bound.
    fn evict(&self) {
        loop {
            let victim = {
                let mut st = lock(&self.state);
                if self.max_bytes == 0 || st.total <= self.max_bytes {
                    return;
                }
                let oldest = st.order.iter().map(|&(_, id)| id).find(|id| st.packs.get(id).is_some_and(|p| p.sealed));
                let Some(id) = oldest else { return };
                st.remove_pack(id)
            };
            if let Some(p) = victim {
                tracing::debug!(pack = %p.stem, "evicting pack");
                remove_quietly(&named(&self.dir, &p.stem, "pack"));
                remove_quietly(&named(&self.dir, &p.stem, "idx"));
            }
        }
    }
}

impl Drop for PackStore {
    /// Seals the active pack, so that the next open loads its index instead of scanning it.
    fn drop(&mut self) {
        let mut w = lock(&self.writer);
        self.seal(&mut w);
    }
}

impl State {
    /// Where a blob is, when held.
    fn find(&self, d: &Digest) -> Option<(Loc, &Pack)> {
        // Packs hold SHA-256 blobs only (their records have 32-byte hashes).
        if !is_sha256(d) {
            return None;
        }
        let loc = *self.index.get(&key(d.hash_bytes()))?;
        (u64::from(loc.size) == d.size()).then(|| Some((loc, self.packs.get(&loc.pack)?)))?
    }

    fn add_pack(&mut self, seq: u64, stem: &str, bytes: u64, sealed: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.packs.insert(id, Pack { seq, stem: stem.to_string(), bytes, sealed, file: None });
        self.order.insert((seq, id));
        self.total += bytes;
        self.recut();
        id
    }

    fn remove_pack(&mut self, id: u32) -> Option<Pack> {
        let p = self.packs.remove(&id)?;
        self.order.remove(&(p.seq, id));
        self.total -= p.bytes;
        self.index.retain(|_, l| l.pack != id);
        self.recut();
        Some(p)
    }

    fn recut(&mut self) {
        self.cutoff = self.order.iter().nth(self.order.len() / 2).copied().unwrap_or((0, 0));
    }
}

/// Indexes a pack as `(length, sealed, records)`: from its index when valid, else by a scan,
/// sealing it when its writer is gone. None when it held no record (then it is removed).
fn load_pack(dir: &Path, stem: &str, has_idx: bool) -> io::Result<Option<(u64, bool, Vec<Entry>)>> {
    let (path, idx) = (named(dir, stem, "pack"), named(dir, stem, "idx"));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let len = file.metadata()?.len();
    if has_idx {
        match read_idx(&idx, len) {
            Ok(entries) => return Ok(Some((len, true, entries))),
            Err(e) => tracing::warn!(pack = stem, error = %e, "pack index unusable; rescanning the pack"),
        }
    }
    if !try_lock(&file)? {
        // A live writer (another process or store) owns it: index what is complete so far.
        return Ok(Some((len, false, scan(&file, len)?.0)));
    }
    // Its writer is gone, or sealed it since the folder was listed.
    if let Some(Ok(entries)) = (!has_idx).then(|| read_idx(&idx, len)) {
        return Ok(Some((len, true, entries)));
    }
    let (entries, end) = scan(&file, len)?;
    if entries.is_empty() {
        fs::remove_file(&path)?;
        remove_quietly(&idx);
        return Ok(None);
    }
    if end < len {
        tracing::warn!(pack = stem, kept = end, dropped = len - end, "cutting a torn pack tail");
        file.set_len(end)?;
    }
    if let Err(e) = write_idx(dir, stem, &entries, end) {
        // A full disk must not cost the blobs already cached: the index is kept in memory
        // (the next open scans again).
        tracing::warn!(pack = stem, error = %e, "could not write a pack index; using the pack without one");
    }
    Ok(Some((end, true, entries)))
}

/// True when a record of `size` bytes at `offset` fits a pack of `len` bytes.
fn fits(size: u32, offset: u64, len: u64) -> bool {
    size != 0 && u64::from(size) <= MAX_BLOB && offset + HEADER as u64 + u64::from(size) <= len
}

/// The whole records of a pack up to `len`, and where they end (at the first bad or torn one).
fn scan(file: &File, len: u64) -> io::Result<(Vec<Entry>, u64)> {
    let mut r = BufReader::with_capacity(1 << 18, file);
    r.seek(SeekFrom::Start(0))?;
    let (mut entries, mut off, mut head) = (Vec::new(), 0u64, [0u8; HEADER]);
    while off + HEADER as u64 <= len && off <= u64::from(u32::MAX) {
        match r.read_exact(&mut head) {
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            res => res?,
        }
        let size = le32(&head, 4);
        if le32(&head, 0) != RECORD_MAGIC || !fits(size, off, len) {
            break;
        }
        entries.push((std::array::from_fn(|i| head[8 + i]), size, off as u32));
        r.seek_relative(i64::from(size))?;
        off += HEADER as u64 + u64::from(size);
    }
    Ok((entries, off))
}

/// The entries of a pack index, checked against the pack's length.
fn read_idx(path: &Path, pack_len: u64) -> io::Result<Vec<Entry>> {
    let b = fs::read(path)?;
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    if b.len() < IDX_HEADER || le32(&b, 0) != IDX_MAGIC {
        return Err(bad("not a pack index"));
    }
    if b.len() as u64 != (IDX_HEADER + IDX_ENTRY * le32(&b, 4) as usize) as u64 || le64(&b, 8) != pack_len {
        return Err(bad("index does not match its pack"));
    }
    let entry = |e: &[u8]| (std::array::from_fn(|i| e[i]), le32(e, 32), le32(e, 36));
    let entries: Vec<Entry> = b[IDX_HEADER..].chunks_exact(IDX_ENTRY).map(entry).collect();
    match entries.iter().all(|&(_, size, offset)| fits(size, u64::from(offset), pack_len)) {
        true => Ok(entries),
        false => Err(bad("entry outside its pack")),
    }
}

/// Writes a pack's index through a temporary file and a rename.
fn write_idx(dir: &Path, stem: &str, entries: &[Entry], pack_len: u64) -> io::Result<()> {
    let mut b = Vec::with_capacity(IDX_HEADER + entries.len() * IDX_ENTRY);
    b.extend_from_slice(&IDX_MAGIC.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&pack_len.to_le_bytes());
    for (hash, size, offset) in entries {
        b.extend_from_slice(hash);
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    let tmp = named(dir, stem, "idx.tmp");
    let res = fs::write(&tmp, &b).and_then(|()| fs::rename(&tmp, named(dir, stem, "idx")));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Removes what dead writers and evictors leave: unlocked pack temporaries and indexes whose
/// pack is gone (a stray index temporary is overwritten when its pack is recovered).
fn clean_stray(dir: &Path, name: &str) {
    let path = dir.join(name);
    let stem_of = |suffix: &str| name.strip_suffix(suffix).filter(|s| parse_stem(s).is_some());
    // A pack temporary is removed while we hold its lock, so a creator that locked it first is left alone.
    let locked = || File::open(&path).and_then(|f| Ok((try_lock(&f)?, f))).is_ok_and(|(locked, _)| locked);
    let orphan = |stem: &str| !named(dir, stem, "pack").exists();
    if (stem_of(".pack.tmp").is_some() && locked()) || stem_of(".idx").is_some_and(orphan) {
        remove_quietly(&path);
    }
}

/// The seq of a pack stem `{seq}-{pid}-{nonce:08x}`; None for any other name.
fn parse_stem(stem: &str) -> Option<u64> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match stem.split('-').collect::<Vec<_>>()[..] {
        [seq, pid, nonce] if digits(seq) && digits(pid) && nonce.len() == 8 => {
            nonce.bytes().all(|b| b.is_ascii_hexdigit()).then(|| seq.parse().ok())?
        }
        _ => None,
    }
}

/// Takes a file's exclusive lock without waiting; false when another open file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The names in a folder.
fn list(dir: &Path) -> Result<HashSet<String>> {
    let rd = fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))?;
    Ok(rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
}

fn named(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    dir.join(format!("{stem}.{ext}"))
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a pack store file")
        }
        _ => {}
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_sha256(d: &Digest) -> bool {
    d.function() == crate::digest::DigestFunction::Sha256
}

fn key(hash: &[u8]) -> Key {
    std::array::from_fn(|i| hash[i])
}

/// Little-endian numbers at `at`; callers check that `b` is long enough.
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
