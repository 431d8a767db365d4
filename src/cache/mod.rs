//! The local blob cache of mounts, runs and workers: one type over every tier.
//!
//! Verified blobs live in one of four places, and [`LocalCache`] is the only way in or out:
//! - small blobs in memory ([`hot`]), appended to pack files ([`pack`]) by a background thread;
//! - large blobs in sealed memory files ([`large`]), copied to blob files in the background;
//! - blob files, one per large blob (a [`DiskStore`] without action cache use);
//! - pack files of small blobs.
//!
//! A blob is always in memory or on disk once it is in; nothing unverified ever enters. The
//! mount, the eager materializer and the executor all see the same cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use crate::cas::{ByteStream, Cas, DiskStore};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::metrics::Metrics;

pub(crate) mod hot;
pub(crate) mod large;
pub(crate) mod pack;
mod tiers;

use hot::HotBlobs;
use large::{memory_file, LargeBlobs};
pub use pack::PackStore;
use tiers::OnDisk;

/// Largest blob kept in memory and in packs rather than in a file of its own.
pub const SMALL_BLOB: u64 = 256 << 10;

/// One bound on the memory a process's cache and filesystems hold, shared out between the
/// tiers that hold it. Each share is enforced where it lives (a tier evicts, or a caller
/// waits or goes to disk), so the shares together never pass the total:
/// - small blobs held in memory: 3/16, plus 1/16 waiting for the pack writer;
/// - validated Directories: 3/16;
/// - small-blob fetches in flight (responses being received and copied): 1/8;
/// - large blobs in memory files until their disk copy is done: 1/4;
/// - inodes and everything else: the last 1/8 (inodes are freed when the kernel forgets
///   them, about 110 bytes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget(pub u64);

impl MemoryBudget {
    /// An eighth of the machine's memory, between 512 MiB and 4 GiB.
    pub fn default_for_machine() -> Self {
        MemoryBudget(machine_memory().map_or(1 << 30, |m| (m / 8).clamp(512 << 20, 4 << 30)))
    }

    /// Small blobs held in memory for immediate reads.
    pub fn small_blobs(self) -> u64 {
        self.0 / 8
    }

    /// Small blobs waiting for the background pack writer (past this, callers write).
    pub fn pending(self) -> u64 {
        self.0 / 16
    }

    /// Validated Directories (weighed by entries).
    pub fn directories(self) -> u64 {
        self.0 / 8
    }

    /// Small-blob fetches in flight (past this, fetches wait).
    pub fn in_flight(self) -> u64 {
        self.0 / 16
    }

    /// Large blobs in memory files (past this, a fetch goes to the disk cache first). The
    /// largest share: a memory file is held only until its disk copy is made, and serving a
    /// cold large read from memory is what keeps it faster than writing the file first (a
    /// 1 GiB blob fits the default budget of a 16 GiB machine).
    pub fn large_files(self) -> u64 {
        self.0 / 2
    }
}

/// Where the cache lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The cache's folder (blob files under `cas/`, packs under `packs/`).
    pub dir: PathBuf,
    /// Bound on disk (0 = none): blob files get three quarters, packs one quarter.
    pub max_bytes: u64,
    /// Small blobs kept in memory for immediate reads.
    pub mem_small_bytes: u64,
    /// Small blobs waiting in memory for the pack writer.
    pub mem_pending_bytes: u64,
    /// Large blobs that may wait in memory files for their copy to disk (bounded across the
    /// process); a large blob that finds no room goes to disk before it is served.
    pub mem_large_bytes: u64,
}

impl CacheConfig {
    /// Defaults for everything but the folder and the bound (the machine's default
    /// [`MemoryBudget`]).
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        Self::with_budget(dir, max_bytes, MemoryBudget::default_for_machine())
    }

    /// A cache whose memory shares come from `budget`.
    pub fn with_budget(dir: impl Into<PathBuf>, max_bytes: u64, budget: MemoryBudget) -> Self {
        CacheConfig {
            dir: dir.into(),
            max_bytes,
            mem_small_bytes: budget.small_blobs(),
            mem_pending_bytes: budget.pending(),
            mem_large_bytes: budget.large_files(),
        }
    }
}

/// The machine's memory in bytes, if it can be read.
fn machine_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64)
}

/// The local blob cache (see the module docs).
pub struct LocalCache {
    disk: Arc<OnDisk>,
    hot: Arc<HotBlobs>,
    large: Arc<LargeBlobs>,
    /// Open blob files, for reads and passthrough backing.
    fds: moka::sync::Cache<Digest, Arc<std::fs::File>>,
    empty_file: PathBuf,
    mem_hits: Arc<AtomicU64>,
    disk_hits: Arc<AtomicU64>,
}

impl LocalCache {
    /// Opens (creating) the cache; its hit counters land in `metrics`.
    pub fn open(cfg: &CacheConfig, metrics: &Metrics) -> Result<Arc<Self>> {
        let disk = OnDisk::open(&cfg.dir, cfg.max_bytes, metrics.counter("casfs_cache_corrupt_blobs_total"))?;
        Self::with(disk, cfg, metrics)
    }

    /// A cache whose disk tier is an existing store, read in place (a server executing
    /// actions over its own storage: inputs are already local, nothing is copied).
    pub fn over_store(store: Arc<DiskStore>, metrics: &Metrics) -> Result<Arc<Self>> {
        let cfg = CacheConfig::new(store.root(), 0);
        Self::with(OnDisk::over(store), &cfg, metrics)
    }

    fn with(disk: OnDisk, cfg: &CacheConfig, metrics: &Metrics) -> Result<Arc<Self>> {
        let disk = Arc::new(disk);
        let empty_file = disk.files.root().join("empty");
        std::fs::write(&empty_file, b"").ctx(|| "creating the empty backing file".into())?;
        let fds: moka::sync::Cache<Digest, Arc<std::fs::File>> = moka::sync::Cache::new(256);
        // An evicted blob file held open would keep its disk space: let it go at once.
        let open = fds.clone();
        // (moka holds a removed value until its pending tasks run: run them now.)
        disk.files.on_evict(Box::new(move |d| {
            open.invalidate(d);
            open.run_pending_tasks();
        }));
        Ok(Arc::new(LocalCache {
            hot: HotBlobs::new(disk.clone(), cfg.mem_small_bytes, cfg.mem_pending_bytes),
            large: LargeBlobs::new(disk.clone(), cfg.mem_large_bytes),
            disk,
            fds,
            empty_file,
            mem_hits: metrics.counter("casfs_blob_memory_hits_total"),
            disk_hits: metrics.counter("casfs_blob_cache_hits_total"),
        }))
    }

    /// The cache's folder.
    pub fn dir(&self) -> &Path {
        self.disk.files.root()
    }

    /// The blob files' store (its bound, its counts).
    pub fn files(&self) -> &DiskStore {
        &self.disk.files
    }

    /// True when the blob is here, in any tier (no fetch, no wait).
    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.hot.contains(digest) || self.large.contains(digest) || self.disk.contains(digest)
    }

    /// True when the blob is here and may be served at once: in memory, in a pack, or in a
    /// blob file already checked in this process's life (see [`LocalCache::check`]).
    pub fn ready(&self, digest: &Digest) -> bool {
        digest.is_empty_blob()
            || self.hot.contains(digest)
            || self.large.contains(digest)
            || self.disk.in_pack(digest)
            || (self.disk.files.contains(digest) && self.disk.trusted(digest))
    }

    /// Makes a blob that is here ready, hashing its blob file whole if this process has not
    /// yet (once per blob per process life). False when it is not here after all: absent,
    /// or its file was corrupt (then deleted): fetch it again.
    pub async fn check(&self, digest: &Digest) -> Result<bool> {
        if self.ready(digest) {
            return Ok(true);
        }
        if !self.disk.files.contains(digest) {
            return Ok(false);
        }
        let disk = self.disk.clone();
        let d = *digest;
        let good = tokio::task::spawn_blocking(move || disk.check_file(&d))
            .await
            .map_err(|e| Error::Internal(format!("checking cached {digest}: {e}")))??;
        if !good {
            self.fds.invalidate(digest);
        }
        Ok(good)
    }

    /// The bytes of a small blob at hand now: held in memory, or in a pack (then kept in
    /// memory as well).
    pub fn bytes_now(&self, digest: &Digest) -> Option<Bytes> {
        if let Some(b) = self.hot.get(digest) {
            self.mem_hits.fetch_add(1, Ordering::Relaxed);
            return Some(b);
        }
        let b = self.disk.packed(digest)?;
        self.disk_hits.fetch_add(1, Ordering::Relaxed);
        self.hot.remember(*digest, b.clone());
        Some(b)
    }

    /// As [`LocalCache::bytes_now`], without keeping a blob read from a pack in memory: for
    /// bytes the caller keeps in another form (a decoded Directory).
    pub fn bytes_once(&self, digest: &Digest) -> Option<Bytes> {
        if let Some(b) = self.hot.get(digest) {
            self.mem_hits.fetch_add(1, Ordering::Relaxed);
            return Some(b);
        }
        let b = self.disk.packed(digest)?;
        self.disk_hits.fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// Path of a blob's own file, if it has one now (marked recently used).
    pub fn path_now(&self, digest: &Digest) -> Option<PathBuf> {
        if digest.is_empty_blob() {
            return Some(self.empty_file.clone());
        }
        if self.disk.files.touch(digest) {
            self.disk_hits.fetch_add(1, Ordering::Relaxed);
            return Some(self.disk.files.blob_path(digest));
        }
        None
    }

    /// An open file holding a blob's verified bytes, if it has one now: its memory file while
    /// it waits for the disk, else its blob file.
    pub fn file_now(&self, digest: &Digest) -> Result<Option<Arc<std::fs::File>>> {
        if let Some(f) = self.large.get(digest) {
            return Ok(Some(f));
        }
        let Some(path) = self.path_now(digest) else {
            // Evicted (or never here): an open file of it would outlive the cache's bound.
            self.fds.invalidate(digest);
            return Ok(None);
        };
        if !self.disk.trusted(digest) {
            // Not served before it was checked once (`check`, on the fetch path).
            return Ok(None);
        }
        if let Some(f) = self.fds.get(digest) {
            return Ok(Some(f));
        }
        match std::fs::File::open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                self.fds.insert(*digest, f.clone());
                Ok(Some(f))
            }
            // Evicted since: not here after all.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening cached {digest}"), e)),
        }
    }

    /// Forgets an open blob file that turned out bad (short).
    pub fn drop_file(&self, digest: &Digest) {
        self.fds.invalidate(digest);
    }

    /// Takes a blob whose bytes were checked against `digest`. A small one is readable at
    /// once and on disk soon (this blocks only when the disk writer is far behind); a large
    /// one is written to its blob file now (blocking), never held in memory.
    /// Packs hold SHA-256 blobs only, so small blobs of other functions get files too.
    pub fn insert_verified(&self, digest: Digest, data: Bytes) {
        if digest.size() <= SMALL_BLOB && packable(&digest) {
            self.hot.insert(digest, data);
        } else if let Err(e) = self.disk.write_file(&digest, &data) {
            if !e.is_disk_full() {
                tracing::warn!(digest = %digest, error = %e, "could not write a blob to the local cache");
            }
        }
    }

    /// As [`LocalCache::insert_verified`], but a small blob is held in memory only until it
    /// is on disk: for bytes the caller keeps in another form (a decoded Directory).
    pub fn insert_verified_cold(&self, digest: Digest, data: Bytes) {
        if digest.size() <= SMALL_BLOB && packable(&digest) {
            self.hot.insert_cold(digest, data);
        } else {
            self.insert_verified(digest, data);
        }
    }

    /// Stores a large blob from a stream, verifying it: into a memory file while it is hashed
    /// (served once it matched, copied to disk after), or straight to a blob file when memory
    /// is short.
    pub async fn insert_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        let Some(room) = self.large.reserve(digest.size()) else {
            return self.disk.write_file_stream(digest, data).await;
        };
        let file = match memory_file(c"casfs-blob") {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "no memory file; writing to the disk cache first");
                return self.disk.write_file_stream(digest, data).await;
            }
        };
        let file = crate::cas::pipe::write_verified(digest, data, file).await?;
        self.large.insert(room, *digest, file);
        Ok(())
    }

    /// Stores a blob straight into a blob file from a stream, verifying it (for blobs about
    /// to be linked, not read).
    pub async fn write_file_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        self.disk.write_file_stream(digest, data).await
    }

    /// Stores bytes already checked against `digest` straight into a blob file (blocking).
    pub fn write_file(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        self.disk.write_file(digest, data)
    }

    /// An open file of its own holding a blob that is here (a small blob held in memory or
    /// a pack is written to a blob file first). `None` when the blob is not here.
    pub async fn file(&self, digest: &Digest) -> Result<Option<Arc<std::fs::File>>> {
        if let Some(f) = self.file_now(digest)? {
            return Ok(Some(f));
        }
        let Some(bytes) = self.bytes_now(digest) else { return Ok(None) };
        let disk = self.disk.clone();
        let d = *digest;
        tokio::task::spawn_blocking(move || disk.write_file(&d, &bytes))
            .await
            .map_err(|e| Error::Internal(format!("storing {digest}: {e}")))??;
        self.file_now(digest)
    }

    /// A blob file to hard-link from, written from memory or a pack if the blob has none yet
    /// (the eager materializer links inputs). `None` when the blob is not here.
    pub async fn link_source(&self, digest: &Digest) -> Result<Option<PathBuf>> {
        if self.path_now(digest).is_some() && self.check(digest).await? {
            return Ok(self.path_now(digest));
        }
        if self.large.contains(digest) {
            // Its disk copy is on the way; wait for it rather than write it twice.
            let large = self.large.clone();
            tokio::task::spawn_blocking(move || large.flush())
                .await
                .map_err(|e| Error::Internal(format!("flushing: {e}")))?;
        }
        match self.file(digest).await? {
            Some(_) => Ok(self.path_now(digest)),
            None => Ok(None),
        }
    }

    /// Waits until every blob taken so far is on disk (blocking).
    pub fn flush(&self) {
        self.hot.flush();
        self.large.flush();
    }
}

/// The cache as a store: the eager materializer and tests read and write through it like
/// any other store. Writes are verified; small blobs go to memory and packs, large ones to
/// files.
#[async_trait::async_trait]
impl Cas for LocalCache {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut seen = std::collections::HashSet::new();
        Ok(digests.iter().filter(|d| !self.contains(d) && seen.insert(**d)).copied().collect())
    }

    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        if offset > digest.size() {
            return Err(Error::InvalidArgument(format!("read offset {offset} is past the end of {digest}")));
        }
        if let Some(b) = self.bytes_now(digest) {
            let end = if limit == 0 { b.len() } else { b.len().min((offset + limit) as usize) };
            let part = b.slice(offset as usize..end);
            return Ok(futures::stream::once(async move { Ok(part) }).boxed());
        }
        if let Some(f) = self.large.get(digest) {
            return Ok(crate::cas::file_range_stream(f, *digest, offset, limit));
        }
        self.disk.files.read_stream(digest, offset, limit).await
    }

    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        if digest.size() > SMALL_BLOB {
            return self.insert_stream(digest, data).await;
        }
        let mut buf = Vec::with_capacity(digest.size() as usize);
        let mut data = data;
        while let Some(chunk) = data.next().await {
            buf.extend_from_slice(&chunk?);
            if buf.len() as u64 > digest.size() {
                return Err(Error::InvalidArgument(format!("more than {} bytes sent for {digest}", digest.size())));
            }
        }
        crate::cas::verify(digest, &buf)?;
        self.insert_verified(*digest, buf.into());
        Ok(())
    }
}

/// Whether a blob may go to a pack (their records have 32-byte SHA-256 hashes).
fn packable(d: &Digest) -> bool {
    d.function() == crate::digest::DigestFunction::Sha256
}
