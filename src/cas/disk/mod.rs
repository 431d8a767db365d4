//! Disk store: one file per blob in a sharded folder, verified atomic writes, LRU eviction.
//!
//! Layout under the root: `cas/<first 2 hex>/<hash>` (the size is the file's length),
//! `ac/<first 2 hex>/<hash>-<size>` (encoded ActionResults), `tmp/` (writes in progress,
//! emptied at open). A blob becomes visible only by `rename` after its bytes were hashed and
//! matched, so a killed writer leaves at most a stray temporary file, never a partial blob.
//! Recency survives restarts through file mtimes, refreshed when a blob is read.
//!
//! Promises (REAPI's lifetime rules): `find_missing` vouches for every blob it reports
//! present (FindMissingBlobs, action-cache hits and Remote Asset records all go through it).
//! A vouched blob is marked recently used and, for `min_lifetime` after that, is never
//! evicted: an upload that would need it gone is refused with RESOURCE_EXHAUSTED instead.
//! Vouch times live in memory; their recency reaches the files' mtimes in batches.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;

use super::quarantine::{hash_file, read_whole, touch_if_older, verified_stream, FullLatch, Quarantine};
use super::trusted::Trusted;
use super::{ByteStream, Cas};
use lru::{Lru, StoreMetrics};

mod action_cache;
mod lru;
mod names;
mod promises;
mod writes;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use names::{digest_of_name, name_of};

/// Streams at least this large are hashed and written on two threads at once.
const PIPELINE_MIN: u64 = 4 << 20;
/// Blobs up to this size are read whole, many per blocking task, rather than streamed.
const WHOLE_READ_MAX: u64 = 1 << 20;
/// Blocking tasks one batch read is spread over.
const READ_TASKS: usize = 8;
/// How stale a blob's mtime may get before a read refreshes it (bounds the extra syscalls).
const TOUCH_AFTER: Duration = Duration::from_secs(600);
/// Vouched blobs whose mtime is refreshed in one blocking batch.
const MTIME_BATCH: usize = 4096;

/// A persistent blob store and action cache in a local folder.
pub struct DiskStore {
    root: PathBuf,
    /// Bound on the bytes of blobs held (0 = none).
    max_bytes: u64,
    lru: Arc<Mutex<Lru>>,
    /// How long a vouched blob is safe from eviction (zero: no promises, plain LRU).
    min_lifetime: Duration,
    metrics: Option<StoreMetrics>,
    /// Where blob files found corrupt go.
    quarantine: Quarantine,
    /// Whether the last write failed for want of space.
    full: FullLatch,
    /// Told of every blob evicted (its owner closes files it holds open).
    evicted: std::sync::OnceLock<EvictHook>,
    /// Files verified in this process's life (a server's store), not hashed again.
    trusted: Option<Arc<Trusted>>,
}

impl DiskStore {
    /// Opens (creating if needed) a store under `root`, evicting least recently used blobs
    /// when the total exceeds `max_bytes` (0 = unbounded). Scans existing blobs.
    pub fn open(root: impl Into<PathBuf>, max_bytes: u64) -> Result<Self> {
        let root = root.into();
        for sub in ["cas", "ac", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp).ctx(|| format!("reading {}", tmp.display()))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut found = Vec::new();
        let cas = root.join("cas");
        for shard in std::fs::read_dir(&cas).ctx(|| format!("reading {}", cas.display()))?.flatten() {
            let Ok(rd) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(d) = digest_of_name(name, meta.len()) else {
                    continue;
                };
                found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), d));
            }
        }
        found.sort();
        let mut lru = Lru::default();
        for (_, d) in found {
            lru.insert(d);
        }
        let quarantine = Quarantine::new(root.join("quarantine"), Arc::new(AtomicU64::new(0)));
        let full = FullLatch::default();
        let store = DiskStore {
            root,
            max_bytes,
            lru: Arc::new(Mutex::new(lru)),
            quarantine,
            full,
            evicted: Default::default(),
            min_lifetime: Duration::ZERO,
            metrics: None,
            trusted: None,
        };
        store.evict(None);
        Ok(store)
    }

    /// Calls `hook` with each blob evicted from now on (once; later hooks are ignored).
    pub fn on_evict(&self, hook: EvictHook) {
        let _ = self.evicted.set(hook);
    }

    /// Counts blobs quarantined from now on in `counter` (a metrics registry's).
    pub fn count_quarantined_in(mut self, counter: Arc<AtomicU64>) -> Self {
        self.quarantine.set_counter(counter);
        self
    }

    /// Hashes a blob file on its first read in this process's life only (and never one it
    /// wrote), until the file changes; counts the reads that skipped hashing in `counter`
    /// (for a server: its clients verify what they read; see `cas::trusted`).
    pub fn trust_what_it_verified(mut self, counter: Arc<AtomicU64>) -> Self {
        self.trusted = Some(Arc::new(Trusted::new(counter)));
        self
    }

    /// Deletes corrupt blob files instead of keeping the newest few aside (for a cache).
    pub fn delete_corrupt(mut self) -> Self {
        self.quarantine.keep = false;
        self
    }

    /// Records how a write into the store went: the first refusal for want of space is
    /// logged at WARN (later ones at DEBUG) until a write succeeds again.
    pub fn note_write<T>(&self, res: &Result<T>) {
        self.full.note(&self.root, res);
    }

    /// Hashes a held blob's file whole (blocking): true when it matches its digest; a
    /// corrupt or short file is put aside and forgotten (false), as is a missing one.
    pub fn verify_file(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match hash_file(&path, digest)? {
            None => {
                self.lru.lock().unwrap().remove(digest);
                Ok(false)
            }
            Some((actual, _)) if actual == *digest => Ok(true),
            Some((actual, ino)) => {
                let why = if actual.size() != digest.size() { "wrong length" } else { "bytes do not match the digest" };
                set_aside(&self.lru, &self.quarantine, &path, digest, ino, why);
                Ok(false)
            }
        }
    }

    /// The folder the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hash_hex();
        self.root.join("cas").join(&hex[..2]).join(name_of(digest, hex.clone()))
    }

    /// Total bytes of blobs held.
    pub fn total_bytes(&self) -> u64 {
        self.lru.lock().unwrap().total
    }

    /// Number of blobs held.
    pub fn blob_count(&self) -> usize {
        self.lru.lock().unwrap().ticks.len()
    }

    /// True when the blob is held, marking it recently used (for readers that open the blob
    /// file themselves, like the mount).
    pub fn touch(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.lru.lock().unwrap().touch(digest)
    }

    /// True when the blob is held (the empty blob always is).
    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.lru.lock().unwrap().ticks.contains_key(digest)
    }

    /// Removes least recently used blobs until the total fits (promised ones stay, even if
    /// that leaves the store over its bound: that only happens at open, or when a promise
    /// was made after room was checked).
    fn evict(&self, keep: Option<&Digest>) {
        if self.max_bytes == 0 {
            return;
        }
        let victims = {
            let mut lru = self.lru.lock().unwrap();
            // Whatever is not promised goes, oldest first, until the total fits.
            let v = lru.victims(self.max_bytes, 0, keep, self.min_lifetime).unwrap_or_else(|| {
                let now = Instant::now();
                lru.order
                    .values()
                    .filter(|d| Some(*d) != keep && !lru.promised(d, self.min_lifetime, now))
                    .copied()
                    .collect()
            });
            for d in &v {
                lru.remove(d);
            }
            v
        };
        self.remove_files(victims);
    }

    fn remove_files(&self, victims: Vec<Digest>) {
        for d in victims {
            tracing::debug!(digest = %d, "evicting blob");
            if let Some(m) = &self.metrics {
                m.evictions.fetch_add(1, Ordering::Relaxed);
                m.evicted_bytes.fetch_add(d.size(), Ordering::Relaxed);
            }
            let _ = std::fs::remove_file(self.blob_path(&d));
            if let Some(hook) = self.evicted.get() {
                hook(&d);
            }
        }
    }

    /// Moves a verified temporary file into place and records it.
    fn commit(&self, digest: &Digest, tmp: tempfile::TempPath) -> Result<()> {
        let dest = self.blob_path(digest);
        // A shard folder is made by the first blob that needs it: a fresh cache (one per cold
        // action) would spend tens of milliseconds making 256 empty folders before mounting.
        let tmp = match tmp.persist(&dest) {
            Ok(()) => None,
            Err(e) if e.error.kind() == std::io::ErrorKind::NotFound => Some(e.path),
            Err(e) => return Err(Error::io(format!("storing {digest}"), e.error)),
        };
        if let Some(tmp) = tmp {
            let shard = dest.parent().ok_or_else(|| Error::Internal(format!("no shard for {digest}")))?;
            std::fs::create_dir_all(shard).ctx(|| format!("creating {}", shard.display()))?;
            tmp.persist(&dest).map_err(|e| Error::io(format!("storing {digest}"), e.error))?;
        }
        // Hashed on its way in; the rename moved its change time, so ask the file now.
        if let (Some(t), Ok(m)) = (&self.trusted, std::fs::metadata(&dest)) {
            t.learn(digest, &m);
        }
        let victims = {
            let mut lru = self.lru.lock().unwrap();
            if self.max_bytes > 0
                && !self.min_lifetime.is_zero()
                && digest.size() <= self.max_bytes
                && !lru.ticks.contains_key(digest)
            {
                match lru.victims(self.max_bytes, digest.size(), Some(digest), self.min_lifetime) {
                    Some(v) => {
                        for d in &v {
                            lru.remove(d);
                        }
                        lru.insert(*digest);
                        Some(v)
                    }
                    None => None,
                }
            } else {
                lru.insert(*digest);
                Some(Vec::new())
            }
        };
        let Some(victims) = victims else {
            let _ = std::fs::remove_file(&dest);
            return Err(self.refusal(digest));
        };
        self.remove_files(victims);
        self.evict(Some(digest));
        Ok(())
    }

    fn temp(&self) -> Result<(std::fs::File, tempfile::TempPath)> {
        let tmp = tempfile::Builder::new()
            .tempfile_in(self.root.join("tmp"))
            .ctx(|| format!("creating a temporary file in {}", self.root.display()))?;
        Ok(tmp.into_parts())
    }

    /// The open blob file and its metadata (as it is after its mtime was refreshed).
    fn open_blob(&self, digest: &Digest) -> Result<(std::fs::File, std::fs::Metadata)> {
        let path = self.blob_path(digest);
        let opened = std::fs::File::open(&path).and_then(|f| f.metadata().map(|m| (f, m)));
        match opened {
            // The file is named by hash only: a digest with the right hash but another size
            // names a blob this store does not have.
            Ok((_, meta)) if meta.len() != digest.size() => {
                if self.contains(digest) {
                    // Held under this very digest, but cut short or grown: corrupt.
                    set_aside(&self.lru, &self.quarantine, &path, digest, Some(meta.ino()), "wrong length");
                }
                Err(Error::MissingBlob(*digest))
            }
            Ok((f, meta)) => {
                self.lru.lock().unwrap().touch(digest);
                let meta = touch_if_older(&f, meta, TOUCH_AFTER, digest)?;
                Ok((f, meta))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.lru.lock().unwrap().remove(digest);
                Err(Error::MissingBlob(*digest))
            }
            Err(e) => Err(Error::io(format!("opening blob {digest}"), e)),
        }
    }

    fn ac_path(&self, action: &Digest) -> PathBuf {
        let hex = action.hash_hex();
        self.root.join("ac").join(&hex[..2]).join(name_of(action, action.to_path_form()))
    }
}

/// Puts a corrupt blob file aside and forgets the blob (unless the file was replaced since).
fn set_aside(lru: &Mutex<Lru>, q: &Quarantine, path: &Path, digest: &Digest, ino: Option<u64>, why: &str) {
    if q.put_aside(path, digest, ino, why) {
        lru.lock().unwrap().remove(digest);
    }
}

/// What [`DiskStore::on_evict`] calls.
pub type EvictHook = Box<dyn Fn(&Digest) + Send + Sync>;

fn check(digest: &Digest, hasher: Hasher) -> Result<()> {
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: Box::new(*digest), actual: Box::new(actual) });
    }
    Ok(())
}

#[async_trait::async_trait]
impl Cas for DiskStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let (missing, present) = {
            let lru = self.lru.lock().unwrap();
            let mut seen = std::collections::HashSet::new();
            let (mut missing, mut present) = (Vec::new(), Vec::new());
            for d in digests {
                if d.is_empty_blob() || !seen.insert(*d) {
                    continue;
                }
                if lru.ticks.contains_key(d) {
                    present.push(*d);
                } else {
                    missing.push(*d);
                }
            }
            (missing, present)
        };
        // Reported present: a promise that they stay for a while.
        self.vouch(&present);
        Ok(missing)
    }

    async fn read(&self, digest: &Digest) -> Result<Bytes> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if digest.size() <= WHOLE_READ_MAX {
            let mut out = self.read_many(std::slice::from_ref(digest)).await?;
            return out.pop().map(|(_, r)| r).unwrap_or(Err(Error::MissingBlob(*digest)));
        }
        // A whole read is checked (and a corrupt file put aside) as it streams.
        let mut stream = self.read_stream(digest, 0, 0).await?;
        let mut buf = Vec::with_capacity(digest.size() as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk?);
        }
        if buf.len() as u64 != digest.size() {
            return Err(Error::Internal(format!("blob {digest} read {} bytes", buf.len())));
        }
        Ok(buf.into())
    }

    /// Small blobs are read in one blocking task for the whole batch (one thread hop, not
    /// one per blob); large ones are streamed.
    async fn read_many(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes>)>> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.iter().partition(|d| d.size() <= WHOLE_READ_MAX || d.is_empty_blob());
        let jobs: Vec<(Digest, PathBuf)> = small.iter().map(|d| (*d, self.blob_path(d))).collect();
        let trusted = self.trusted.clone();
        // Several blocking tasks at once keep the disk busy when the blobs are not in the
        // page cache (one small random read after another is slow on most disks).
        let per_task = jobs.len().div_ceil(READ_TASKS).max(1);
        let tasks: Vec<_> = jobs
            .chunks(per_task)
            .map(|chunk| {
                let (chunk, trusted) = (chunk.to_vec(), trusted.clone());
                tokio::task::spawn_blocking(move || {
                    chunk
                        .into_iter()
                        .map(|(d, p)| {
                            let t = trusted.as_deref();
                            (d, if d.is_empty_blob() { Ok(Bytes::new()) } else { read_whole(&p, &d, TOUCH_AFTER, t) })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(digests.len());
        for t in tasks {
            out.extend(t.await.map_err(|e| Error::Internal(format!("reading blobs: {e}")))?);
        }
        {
            let mut lru = self.lru.lock().unwrap();
            for (d, r) in &out {
                match r {
                    Ok(_) => {
                        lru.touch(d);
                    }
                    Err(Error::MissingBlob(_)) => lru.remove(d),
                    Err(_) => {}
                }
            }
        }
        for (d, r) in &out {
            if let Err(Error::DigestMismatch { .. }) = r {
                set_aside(&self.lru, &self.quarantine, &self.blob_path(d), d, None, "bytes do not match the digest");
            }
        }
        for d in large {
            out.push((d, self.read(&d).await));
        }
        Ok(out)
    }

    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        if offset > digest.size() {
            return Err(Error::InvalidArgument(format!("read offset {offset} is past the end of {digest}")));
        }
        if digest.is_empty_blob() {
            return Ok(futures::stream::empty().boxed());
        }
        let (file, meta) = self.open_blob(digest)?;
        let end = if limit == 0 { digest.size() } else { digest.size().min(offset.saturating_add(limit)) };
        let ino = Some(meta.ino());
        // A few chunks read ahead; a reader that stops reading holds no thread.
        let stream = super::read_ahead::stream(file, *digest, offset, end);
        if offset != 0 || end != digest.size() || self.trusted.as_deref().is_some_and(|t| t.knows(digest, &meta)) {
            // A part cannot be checked (whoever reads the whole checks it); a known file
            // need not be.
            return Ok(stream);
        }
        let (lru, q, path, d) = (self.lru.clone(), self.quarantine.clone(), self.blob_path(digest), *digest);
        let on_bad = move || set_aside(&lru, &q, &path, &d, ino, "bytes do not match the digest");
        let trusted = self.trusted.clone();
        let on_good = move || {
            if let Some(t) = trusted {
                t.learn(&d, &meta);
            }
        };
        Ok(verified_stream(stream, *digest, on_bad, on_good))
    }

    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        let res = self.write_stream_unnoted(digest, data).await;
        self.note_write(&res);
        res
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        super::verify(digest, &data)?;
        self.check_room(digest)?;
        let res = (|| {
            let (mut file, tmp) = self.temp()?;
            file.write_all(&data).ctx(|| format!("writing blob {digest}"))?;
            drop(file);
            self.commit(digest, tmp)
        })();
        self.note_write(&res);
        res
    }
}
