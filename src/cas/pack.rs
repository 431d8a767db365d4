//! Pack store: small verified blobs kept in append-only pack files, so caching a batch costs one write.
//!
//! Files in the folder: `{seq:010}-{pid}-{nonce:08x}.pack`, a run of records (magic u32 LE,
//! size u32 LE, 32-byte hash, data), and once sealed `<same stem>.idx` (magic, entry count,
//! pack length, then hash/size/offset per record). A pack is written only by the store that
//! created it, which holds `flock(LOCK_EX)` on it until it seals it; an unlocked pack without
//! an index was left by a dead writer and is recovered at open (scanned, cut at its first torn
//! record, sealed). Packs are never fsynced: this is a cache, and a crash costs at most a tail.
//! The size bound deletes whole sealed packs, oldest first; blobs read from the older half of
//! the packs are copied forward by the next append, so the bound behaves like an LRU.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
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
/// Record header: magic, size, hash.
const HEADER: usize = 40;
/// Index header: magic, entry count, length of the pack it describes.
const IDX_HEADER: usize = 16;
/// Index entry: hash, size, offset.
const IDX_ENTRY: usize = 40;
const MIN_PACK: u64 = 1 << 20;
const MAX_PACK: u64 = 64 << 20;
/// Read handles kept before they are all closed (and reopened on demand).
const MAX_OPEN: usize = 256;

/// Index key: the first 128 bits of the hash (collisions are out of reach), so that an entry
/// takes 28 bytes; reads still compare the full hash stored in the record.
type Key = [u8; 16];

#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u32,
    size: u32,
}

/// A record as found in a pack or its index.
struct Entry {
    hash: [u8; 32],
    size: u32,
    offset: u32,
}

struct Pack {
    seq: u64,
    stem: String,
    bytes: u64,
    sealed: bool,
    /// This store's active pack.
    writing: bool,
    file: Option<Arc<File>>,
}

#[derive(Default)]
struct State {
    index: HashMap<Key, Loc>,
    packs: HashMap<u32, Pack>,
    /// (seq, id) of every pack, oldest first.
    order: BTreeSet<(u64, u32)>,
    /// Packs ordered below this are the older half.
    cutoff: (u64, u32),
    total: u64,
    next_id: u32,
    max_seq: u64,
    open_files: usize,
    /// Blobs read from the older half, to be written again by the next append.
    requeue: Vec<(Digest, Bytes)>,
    requeued: HashSet<Key>,
    requeued_bytes: u64,
}

struct Active {
    id: u32,
    stem: String,
    file: File,
    len: u64,
}

/// A blob cache of append-only pack files in one folder, bounded by deleting the oldest packs.
/// Safe to share between threads; other stores (in this process or others) may use the same
/// folder at once, each appending to its own pack.
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
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
            if let Ok(name) = e.ctx(|| format!("reading {}", dir.display()))?.file_name().into_string() {
                names.push(name);
            }
        }
        let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut packs: Vec<(u64, &str)> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".pack").and_then(|stem| Some((parse_stem(stem)?, stem))))
            .collect();
        packs.sort_unstable();
        let mut st = State::default();
        for (seq, stem) in packs {
            match load_pack(&dir, stem, listed.contains(format!("{stem}.idx").as_str())) {
                Ok(Some((len, sealed, entries))) => {
                    st.index.reserve(entries.len());
                    let id = st.add_pack(seq, stem, len, sealed, false);
                    st.add_entries(id, &entries);
                }
                Ok(None) => tracing::debug!(pack = stem, "removed an empty abandoned pack"),
                Err(e) => tracing::warn!(pack = stem, error = %e, "skipping an unreadable pack"),
            }
        }
        for name in &names {
            clean_stray(&dir, name);
        }
        let pack_size = if max_bytes == 0 { MAX_PACK } else { (max_bytes / 16).clamp(MIN_PACK, MAX_PACK) };
        let store = PackStore { dir, max_bytes, pack_size, state: Mutex::new(st), writer: Mutex::new(None) };
        store.evict();
        Ok(store)
    }

    /// True when the blob is held (the empty blob always is).
    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || lock(&self.state).holds(digest)
    }

    /// The blob's bytes, checked against its digest; Ok(None) when absent, or when the
    /// stored bytes turn out wrong (then the entry is dropped and a warning naming the
    /// digest is logged with `tracing::warn!`, so the caller fetches it again).
    pub fn read(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let k = key(digest.hash_bytes());
        let (loc, file, stem, old) = {
            let st = lock(&self.state);
            let Some(&loc) = st.index.get(&k).filter(|l| u64::from(l.size) == digest.size()) else { return Ok(None) };
            let Some(p) = st.packs.get(&loc.pack) else { return Ok(None) };
            (loc, p.file.clone(), p.stem.clone(), (p.seq, loc.pack) < st.cutoff)
        };
        let path = self.dir.join(format!("{stem}.pack"));
        let file = match file {
            Some(f) => f,
            None => match File::open(&path) {
                Ok(f) => self.keep_open(loc.pack, f),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::debug!(pack = %stem, "pack deleted by another store; dropping its entries");
                    lock(&self.state).remove_pack(loc.pack);
                    return Ok(None);
                }
                Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
            },
        };
        let mut buf = vec![0u8; HEADER + loc.size as usize];
        let bad = match file.read_exact_at(&mut buf, u64::from(loc.offset)) {
            Ok(()) => {
                le32(&buf, 0) != RECORD_MAGIC
                    || le32(&buf, 4) != loc.size
                    || buf[8..HEADER] != digest.hash_bytes()[..]
                    || crate::cas::verify(digest, &buf[HEADER..]).is_err()
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(Error::io(format!("reading {digest} from {}", path.display()), e)),
        };
        if bad {
            tracing::warn!(digest = %digest, pack = %stem, "cached blob is corrupt; dropping it");
            let mut st = lock(&self.state);
            if st.index.get(&k) == Some(&loc) {
                st.index.remove(&k);
            }
            return Ok(None);
        }
        let data = Bytes::from(buf).slice(HEADER..);
        if old && self.max_bytes != 0 {
            let mut st = lock(&self.state);
            if st.requeued_bytes + digest.size() <= self.pack_size && st.requeued.insert(k) {
                st.requeued_bytes += digest.size();
                st.requeue.push((*digest, data.clone()));
            }
        }
        Ok(Some(data))
    }

    /// Appends blobs whose bytes the caller has already verified against their digests
    /// (blocking). Already-held blobs and the empty blob are skipped; a blob larger than
    /// MAX_BLOB or whose length differs from digest.size() is an Error::Internal and nothing
    /// of that call is written.
    pub fn append_verified(&self, blobs: &[(Digest, Bytes)]) -> Result<()> {
        for (d, data) in blobs {
            if d.size() > MAX_BLOB || data.len() as u64 != d.size() {
                let n = data.len();
                return Err(Error::Internal(format!("cannot pack {d}: {n} bytes given, at most {MAX_BLOB} held")));
            }
        }
        let mut w = lock(&self.writer);
        let todo: Vec<(Digest, Bytes)> = {
            let mut st = lock(&self.state);
            let mut seen = HashSet::new();
            let mut todo: Vec<_> =
                blobs.iter().filter(|(d, _)| !d.is_empty_blob() && !st.holds(d) && seen.insert(*d)).cloned().collect();
            st.requeued.clear();
            st.requeued_bytes = 0;
            todo.extend(std::mem::take(&mut st.requeue).into_iter().filter(|(d, _)| seen.insert(*d)));
            todo
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

    /// Writes `buf` (records at offsets `recs` within it) at the end of the active pack, starting
    /// one if there is none, and indexes them.
    fn flush(&self, w: &mut Option<Active>, buf: &mut Vec<u8>, recs: &mut Vec<(Key, u64, u32)>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let a = match w {
            Some(a) => a,
            None => w.insert(self.start_pack()?),
        };
        if let Err(e) = a.file.write_all_at(buf, a.len) {
            let err = Error::io(format!("appending to {}.pack", a.stem), e);
            // Cut the partial write off; failing that, give the pack up unsealed (its lock goes
            // with the file, and the next open cuts the torn tail).
            if a.file.set_len(a.len).is_err() {
                if let Some(p) = lock(&self.state).packs.get_mut(&a.id) {
                    p.writing = false;
                }
                *w = None;
            }
            buf.clear();
            recs.clear();
            return Err(err);
        }
        let n = buf.len() as u64;
        let mut st = lock(&self.state);
        for (k, off, size) in recs.drain(..) {
            st.index.insert(k, Loc { pack: a.id, offset: (a.len + off) as u32, size });
        }
        if let Some(p) = st.packs.get_mut(&a.id) {
            p.bytes += n;
            st.total += n;
        }
        a.len += n;
        buf.clear();
        Ok(())
    }

    /// Creates a new active pack, locked before it gets its name so no opener takes it for a
    /// dead writer's.
    fn start_pack(&self) -> Result<Active> {
        let listed = fs::read_dir(&self.dir)
            .ctx(|| format!("reading {}", self.dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pack").and_then(parse_stem))
            .max()
            .unwrap_or(0);
        let seq = listed.max(lock(&self.state).max_seq) + 1;
        for _ in 0..8 {
            let stem = format!("{seq:010}-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let tmp = self.dir.join(format!("{stem}.pack.tmp"));
            let path = self.dir.join(format!("{stem}.pack"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .ctx(|| format!("creating {}", tmp.display()))?;
            // A cleaner in another store may take and remove the temporary file; then try again.
            let linked = try_lock(&file).ctx(|| format!("locking {}", tmp.display()))?
                && match fs::hard_link(&tmp, &path) {
                    Ok(()) => true,
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::AlreadyExists) => false,
                    Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
                };
            let _ = fs::remove_file(&tmp);
            if linked {
                let id = lock(&self.state).add_pack(seq, &stem, 0, false, true);
                return Ok(Active { id, stem, file, len: 0 });
            }
        }
        Err(Error::Internal(format!("could not create a pack file in {}", self.dir.display())))
    }

    /// Seals the active pack: writes its index, then lets its lock go. An empty one is deleted.
    fn seal(&self, w: &mut Option<Active>) {
        let Some(a) = w.take() else { return };
        let path = self.dir.join(format!("{}.pack", a.stem));
        if a.len == 0 {
            let _ = fs::remove_file(&path);
            lock(&self.state).remove_pack(a.id);
            return;
        }
        let res = scan(&a.file, a.len).and_then(|(entries, _)| write_idx(&self.dir, &a.stem, &entries, a.len));
        if let Err(e) = &res {
            tracing::warn!(pack = %path.display(), error = %e, "could not seal pack; the next open recovers it");
        }
        if let Some(p) = lock(&self.state).packs.get_mut(&a.id) {
            p.writing = false;
            p.sealed = res.is_ok();
        }
    }

    /// Keeps a read handle for a pack, closing all others first when too many are open.
    fn keep_open(&self, id: u32, file: File) -> Arc<File> {
        let file = Arc::new(file);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.open_files >= MAX_OPEN {
            st.packs.values_mut().for_each(|p| p.file = None);
            st.open_files = 0;
        }
        if let Some(p) = st.packs.get_mut(&id).filter(|p| p.file.is_none()) {
            p.file = Some(file.clone());
            st.open_files += 1;
        }
        file
    }

    /// Deletes the oldest sealed packs (never this store's active one) while over the bound.
    fn evict(&self) {
        if self.max_bytes == 0 {
            return;
        }
        let mut unsealed = HashSet::new();
        loop {
            let (id, stem, sealed) = {
                let st = lock(&self.state);
                if st.total <= self.max_bytes {
                    return;
                }
                let candidate = st.order.iter().find_map(|(_, id)| {
                    st.packs.get(id).filter(|p| !p.writing && !unsealed.contains(id)).map(|p| (*id, p))
                });
                let Some((id, p)) = candidate else { return };
                (id, p.stem.clone(), p.sealed)
            };
            if !sealed {
                // Another writer's pack as seen at open: evictable once that writer sealed it.
                if self.dir.join(format!("{stem}.idx")).exists() {
                    if let Some(p) = lock(&self.state).packs.get_mut(&id) {
                        p.sealed = true;
                    }
                } else {
                    unsealed.insert(id);
                }
                continue;
            }
            if lock(&self.state).remove_pack(id).is_none() {
                continue;
            }
            tracing::debug!(pack = %stem, "evicting pack");
            for ext in ["pack", "idx"] {
                let path = self.dir.join(format!("{stem}.{ext}"));
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => {
                        tracing::warn!(path = %path.display(), error = %e, "could not delete an evicted pack")
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Drop for PackStore {
    /// Seals the active pack, so the next open loads its index instead of scanning it.
    fn drop(&mut self) {
        let mut w = lock(&self.writer);
        self.seal(&mut w);
    }
}

impl State {
    fn holds(&self, d: &Digest) -> bool {
        self.index.get(&key(d.hash_bytes())).is_some_and(|l| u64::from(l.size) == d.size())
    }

    fn add_pack(&mut self, seq: u64, stem: &str, bytes: u64, sealed: bool, writing: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.packs.insert(id, Pack { seq, stem: stem.to_string(), bytes, sealed, writing, file: None });
        self.order.insert((seq, id));
        self.total += bytes;
        self.max_seq = self.max_seq.max(seq);
        self.recut();
        id
    }

    fn add_entries(&mut self, pack: u32, entries: &[Entry]) {
        for e in entries {
            self.index.insert(key(&e.hash), Loc { pack, offset: e.offset, size: e.size });
        }
    }

    fn remove_pack(&mut self, id: u32) -> Option<Pack> {
        let p = self.packs.remove(&id)?;
        self.order.remove(&(p.seq, id));
        self.total -= p.bytes;
        if p.file.is_some() {
            self.open_files -= 1;
        }
        self.index.retain(|_, l| l.pack != id);
        self.recut();
        Some(p)
    }

    fn recut(&mut self) {
        self.cutoff = self.order.iter().nth(self.order.len() / 2).copied().unwrap_or((0, 0));
    }
}

/// Indexes one pack as `(length, sealed, records)`: from its index when it has a valid one;
/// else by a scan, sealing it when its writer is gone. None when it held nothing (then removed).
fn load_pack(dir: &Path, stem: &str, has_idx: bool) -> io::Result<Option<(u64, bool, Vec<Entry>)>> {
    let path = dir.join(format!("{stem}.pack"));
    let idx = dir.join(format!("{stem}.idx"));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let len = file.metadata()?.len();
    if has_idx {
        match read_idx(&idx, len) {
            Ok(entries) => return Ok(Some((len, true, entries))),
            Err(e) => tracing::warn!(pack = %path.display(), error = %e, "pack index unusable; rescanning the pack"),
        }
    }
    if !try_lock(&file)? {
        // A live writer (another process or store) owns it: index what is complete so far.
        return Ok(Some((len, false, scan(&file, len)?.0)));
    }
    // Its writer is gone, or sealed it since the folder was listed.
    if !has_idx {
        if let Ok(entries) = read_idx(&idx, len) {
            return Ok(Some((len, true, entries)));
        }
    }
    let (entries, end) = scan(&file, len)?;
    if entries.is_empty() {
        fs::remove_file(&path)?;
        let _ = fs::remove_file(&idx);
        return Ok(None);
    }
    if end < len {
        tracing::warn!(pack = %path.display(), kept = end, dropped = len - end, "cutting a torn pack tail");
        file.set_len(end)?;
    }
    write_idx(dir, stem, &entries, end)?;
    Ok(Some((end, true, entries)))
}

/// The complete records of a pack up to `len`, and where they end (the first bad or torn record).
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
        let end = off + HEADER as u64 + u64::from(size);
        if le32(&head, 0) != RECORD_MAGIC || size == 0 || u64::from(size) > MAX_BLOB || end > len {
            break;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&head[8..]);
        entries.push(Entry { hash, size, offset: off as u32 });
        r.seek_relative(i64::from(size))?;
        off = end;
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
    if b.len() as u64 != IDX_HEADER as u64 + u64::from(le32(&b, 4)) * IDX_ENTRY as u64 || le64(&b, 8) != pack_len {
        return Err(bad("index does not match its pack"));
    }
    let mut out = Vec::with_capacity((b.len() - IDX_HEADER) / IDX_ENTRY);
    for e in b[IDX_HEADER..].chunks_exact(IDX_ENTRY) {
        let (size, offset) = (le32(e, 32), le32(e, 36));
        if size == 0 || u64::from(size) > MAX_BLOB || u64::from(offset) + (HEADER as u64) + u64::from(size) > pack_len {
            return Err(bad("entry outside its pack"));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[..32]);
        out.push(Entry { hash, size, offset });
    }
    Ok(out)
}

/// Writes a pack's index through a temporary file and a rename.
fn write_idx(dir: &Path, stem: &str, entries: &[Entry], pack_len: u64) -> io::Result<()> {
    let mut b = Vec::with_capacity(IDX_HEADER + entries.len() * IDX_ENTRY);
    b.extend_from_slice(&IDX_MAGIC.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&pack_len.to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.hash);
        b.extend_from_slice(&e.size.to_le_bytes());
        b.extend_from_slice(&e.offset.to_le_bytes());
    }
    let tmp = dir.join(format!("{stem}.idx.tmp"));
    fs::write(&tmp, &b)?;
    fs::rename(&tmp, dir.join(format!("{stem}.idx")))
}

/// Removes what dead writers and evictors leave: unlocked pack temporaries, and index files
/// (or their temporaries) whose pack is gone or already sealed. Other files are left alone.
fn clean_stray(dir: &Path, name: &str) {
    let path = dir.join(name);
    let exists = |stem: &str, ext: &str| dir.join(format!("{stem}.{ext}")).exists();
    let valid = |s: &&str| parse_stem(s).is_some();
    let stray = if name.strip_suffix(".pack.tmp").filter(valid).is_some() {
        // Kept open (so locked) until removed: a creator that locked it first is left alone.
        if let Ok(f) = File::open(&path) {
            if try_lock(&f).unwrap_or(false) {
                let _ = fs::remove_file(&path);
            }
        }
        false
    } else if let Some(stem) = name.strip_suffix(".idx.tmp").filter(valid) {
        !exists(stem, "pack") || exists(stem, "idx")
    } else if let Some(stem) = name.strip_suffix(".idx").filter(valid) {
        !exists(stem, "pack")
    } else {
        false
    };
    if stray {
        let _ = fs::remove_file(&path);
    }
}

/// The seq of a pack stem `{seq}-{pid}-{nonce:08x}`; None for any other name.
fn parse_stem(stem: &str) -> Option<u64> {
    let mut parts = stem.split('-');
    let (seq, pid, nonce) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = parts.next().is_none() && digits(pid) && nonce.len() == 8 && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    if ok && digits(seq) {
        seq.parse().ok()
    } else {
        None
    }
}

/// Takes a file's exclusive lock without waiting; false when another open file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock takes a descriptor this `File` owns and touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(hash: &[u8; 32]) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&hash[..16]);
    k
}

/// Callers check that `b` holds `at + 4` bytes.
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
