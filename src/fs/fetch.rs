//! Lazy, verified fetching for the filesystem: a bounded cache of validated Directories, the
//! persistent local blob cache, one fetch per digest however many readers wait, and batched
//! fetching of small sibling files. Verified blobs are served from memory at once and reach
//! the disk cache in the background: small ones from `hot`, large ones from memory files
//! (`large`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;

use super::hot::HotBlobs;
use super::large::{memory_file, LargeBlobs};
use crate::cas::{Cas, DiskStore, SharedActionCache, SharedCas};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tree::Directory;

/// Files up to this size are fetched in batches with their small siblings.
pub const SMALL_BLOB: u64 = 256 << 10;
/// Most bytes one sibling batch brings in.
const SIBLING_BATCH_BYTES: u64 = 3 << 20;
/// Most files one sibling batch brings in.
const SIBLING_BATCH_FILES: usize = 2048;

/// How the fetcher behaves.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Longest a fetch may take before the reader gets EIO.
    pub deadline: Duration,
    /// Weight bound of the Directory cache, in bytes of encoded Directories.
    pub dir_cache_bytes: u64,
    /// Fetch the small files of a directory together once a second one is read.
    pub batch_siblings: bool,
    /// Bytes of small blobs (and Directories) kept in memory for immediate reads.
    pub mem_cache_bytes: u64,
    /// Bytes of large blobs that may wait in memory for their copy to the disk cache; a
    /// large fetch that finds no room writes to the disk cache before it is served.
    pub mem_large_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            deadline: Duration::from_secs(30),
            dir_cache_bytes: 256 << 20,
            batch_siblings: true,
            mem_cache_bytes: 256 << 20,
            mem_large_bytes: default_large_bytes(),
        }
    }
}

/// An eighth of the machine's memory, at most 4 GiB.
fn default_large_bytes() -> u64 {
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page <= 0 {
        return 1 << 30;
    }
    ((pages as u64 * page as u64) / 8).min(4 << 30)
}

type Flight<V> = Shared<BoxFuture<'static, std::result::Result<V, Arc<Error>>>>;

/// A failed flight, as each of its waiters reports it.
fn shared(digest: Digest) -> impl Fn(Arc<Error>) -> Error {
    move |source| Error::Fetch { digest, source }
}

/// Runs at most one future per key at a time; later callers share its result.
struct SingleFlight<V: Clone> {
    map: Mutex<HashMap<Digest, Flight<V>>>,
}

impl<V: Clone + Send + Sync + 'static> SingleFlight<V> {
    fn new() -> Self {
        SingleFlight { map: Mutex::new(HashMap::new()) }
    }

    async fn run<F>(&self, key: Digest, make: F) -> std::result::Result<V, Arc<Error>>
    where
        F: FnOnce() -> BoxFuture<'static, Result<V>>,
    {
        let fut = {
            let mut map = self.map.lock().unwrap();
            match map.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = make().map(|r| r.map_err(Arc::new)).boxed().shared();
                    map.insert(key, f.clone());
                    f
                }
            }
        };
        let out = fut.await;
        self.map.lock().unwrap().remove(&key);
        out
    }
}

/// Where a node's content comes from: one REAPI instance's stores.
#[derive(Clone)]
pub struct Remote {
    /// Its blobs.
    pub cas: SharedCas,
    /// Its action cache, when browsing actions.
    pub ac: Option<SharedActionCache>,
}

impl Remote {
    /// A remote for these stores, ready to be shared by nodes.
    pub fn new(cas: SharedCas, ac: Option<SharedActionCache>) -> Arc<Self> {
        Arc::new(Remote { cas, ac })
    }
}

/// Fetches Directories and file contents on demand, verified, through the local caches.
pub struct Fetcher {
    local: Arc<DiskStore>,
    hot: Arc<HotBlobs>,
    large: Arc<LargeBlobs>,
    /// Open disk cache files, for reads and passthrough backing.
    fds: moka::sync::Cache<Digest, Arc<std::fs::File>>,
    dirs: moka::sync::Cache<Digest, Arc<Directory>>,
    dir_flight: SingleFlight<Arc<Directory>>,
    blob_flight: SingleFlight<()>,
    reads_per_dir: moka::sync::Cache<Digest, ()>,
    empty_file: PathBuf,
    cfg: FetchConfig,
    metrics: Arc<Metrics>,
    /// Hit counters of the read path, looked up once.
    mem_hits: Arc<std::sync::atomic::AtomicU64>,
    disk_hits: Arc<std::sync::atomic::AtomicU64>,
    failures: Mutex<FetchFailures>,
}

/// Fetches that failed since the fetcher was made (the executor reads these to tell an
/// infrastructure failure from the command's own).
#[derive(Clone, Debug, Default)]
pub struct FetchFailures {
    /// Failed fetches of any kind.
    pub count: u64,
    /// Digests the remote did not have.
    pub missing: Vec<Digest>,
}

impl Fetcher {
    /// A fetcher reading through the local blob cache `local` from the remotes its callers name.
    pub fn new(local: Arc<DiskStore>, cfg: FetchConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let dirs = moka::sync::Cache::builder()
            .max_capacity(cfg.dir_cache_bytes)
            .weigher(|_, d: &Arc<Directory>| (64 + 96 * d.len()).min(u32::MAX as usize) as u32)
            .build();
        // Opened here, not on the first read: its index loads in proportion to the cache.
        let _ = local.packs();
        let empty_file = local.root().join("empty");
        std::fs::write(&empty_file, b"").map_err(|e| Error::io("creating the empty backing file", e))?;
        Ok(Arc::new(Fetcher {
            hot: HotBlobs::new(local.clone(), cfg.mem_cache_bytes),
            large: LargeBlobs::new(local.clone(), cfg.mem_large_bytes),
            fds: moka::sync::Cache::new(256),
            local,
            dirs,
            dir_flight: SingleFlight::new(),
            blob_flight: SingleFlight::new(),
            reads_per_dir: moka::sync::Cache::new(100_000),
            empty_file,
            cfg,
            mem_hits: metrics.counter("casfs_blob_memory_hits_total"),
            disk_hits: metrics.counter("casfs_blob_cache_hits_total"),
            metrics,
            failures: Mutex::new(FetchFailures::default()),
        }))
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A Directory already in memory (no fetch, no wait).
    pub fn cached_dir(&self, digest: &Digest) -> Option<Arc<Directory>> {
        let hit = self.dirs.get(digest);
        if hit.is_some() {
            self.metrics.add("casfs_dir_cache_hits_total", 1);
        }
        hit
    }

    /// What failed so far.
    pub fn failures(&self) -> FetchFailures {
        self.failures.lock().unwrap().clone()
    }

    fn note_failure(&self, e: &Error) {
        self.metrics.add("casfs_fetch_failures_total", 1);
        let mut f = self.failures.lock().unwrap();
        f.count += 1;
        if let Error::MissingBlob(d) = e {
            if f.missing.len() < 1000 && !f.missing.contains(d) {
                f.missing.push(*d);
            }
        }
    }

    /// A validated Directory, fetched (once, however many callers wait) if needed.
    pub async fn dir(self: &Arc<Self>, digest: Digest, remote: &Arc<Remote>) -> Result<Arc<Directory>> {
        if let Some(d) = self.cached_dir(&digest) {
            return Ok(d);
        }
        self.metrics.add("casfs_dir_cache_misses_total", 1);
        let this = self.clone();
        let remote = remote.clone();
        self.dir_flight
            .run(digest, move || {
                async move {
                    let dir = this
                        .with_deadline(digest, this.fetch_dir(digest, &remote))
                        .await
                        .inspect_err(|e| this.note_failure(e))?;
                    this.dirs.insert(digest, dir.clone());
                    Ok(dir)
                }
                .boxed()
            })
            .await
            .map_err(shared(digest))
    }

    async fn fetch_dir(&self, digest: Digest, remote: &Remote) -> Result<Arc<Directory>> {
        let bytes = if let Some(b) = self.bytes_now(&digest) {
            b
        } else if self.local.contains(&digest) {
            self.local.read(&digest).await?
        } else {
            let started = Instant::now();
            let bytes = remote.cas.read(&digest).await?;
            self.metrics.add("casfs_fetch_dirs_total", 1);
            self.metrics.add("casfs_fetch_bytes_total", bytes.len() as u64);
            self.metrics.histogram("casfs_fetch_seconds{kind=\"dir\"}").observe(started.elapsed());
            // `read` returned verified bytes.
            self.hot.insert(digest, bytes.clone());
            bytes
        };
        Ok(Arc::new(Directory::decode(&digest, &bytes)?))
    }

    async fn with_deadline<T>(&self, digest: Digest, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.cfg.deadline, fut).await {
            Ok(r) => r,
            Err(_) => {
                Err(Error::DeadlineExceeded(format!("fetching {digest} took longer than {:?}", self.cfg.deadline)))
            }
        }
    }

    /// Path of a blob in the local cache, if it is there now (no fetch).
    pub fn local_path(&self, digest: &Digest) -> Option<PathBuf> {
        if digest.is_empty_blob() {
            return Some(self.empty_file.clone());
        }
        if self.local.touch(digest) {
            self.disk_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(self.local.blob_path(digest));
        }
        None
    }

    /// The bytes of a small blob at hand now (no fetch): held in memory, or in the disk
    /// cache's packs (then kept in memory as well).
    pub fn bytes_now(&self, digest: &Digest) -> Option<bytes::Bytes> {
        if let Some(b) = self.hot.get(digest) {
            self.mem_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(b);
        }
        let packs = self.local.packs()?;
        match packs.read(digest) {
            Ok(Some(b)) => {
                self.disk_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.hot.remember(*digest, b.clone());
                Some(b)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cannot read the local cache's packs");
                None
            }
        }
    }

    /// True when the blob is local: in memory or in the disk cache (no fetch).
    fn is_local(&self, digest: &Digest) -> bool {
        digest.is_empty_blob()
            || self.hot.contains(digest)
            || self.large.contains(digest)
            || self.local.packs().is_some_and(|p| p.contains(digest))
            || self.local.contains(digest)
    }

    /// Waits until every blob fetched so far is in the disk cache (blocking).
    pub fn flush(&self) {
        self.hot.flush();
        self.large.flush();
    }

    /// An open file holding a blob's verified bytes, if it is local now (no fetch): its
    /// memory file while it waits for the disk, else its disk cache file.
    pub fn file_now(&self, digest: &Digest) -> Result<Option<Arc<std::fs::File>>> {
        if let Some(f) = self.large.get(digest) {
            return Ok(Some(f));
        }
        let Some(path) = self.local_path(digest) else {
            // Evicted (or never here): an open file of it would outlive the cache's bound.
            self.fds.invalidate(digest);
            return Ok(None);
        };
        if let Some(f) = self.fds.get(digest) {
            return Ok(Some(f));
        }
        match std::fs::File::open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                self.fds.insert(*digest, f.clone());
                Ok(Some(f))
            }
            // Evicted since: not local after all.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening cached {digest}"), e)),
        }
    }

    /// Forgets an open disk cache file that turned out bad (short).
    pub fn drop_file(&self, digest: &Digest) {
        self.fds.invalidate(digest);
    }

    /// Makes a blob local (fetched once, verified) and returns an open file holding it (a
    /// small blob held in memory is written to the disk cache first). `parent`: see
    /// [`Fetcher::load`].
    pub async fn open_blob(
        self: &Arc<Self>,
        digest: Digest,
        remote: &Arc<Remote>,
        parent: Option<Digest>,
    ) -> Result<Arc<std::fs::File>> {
        if let Some(f) = self.file_now(&digest)? {
            return Ok(f);
        }
        self.load(digest, remote, parent).await?;
        if !self.local.contains(&digest) && !self.large.contains(&digest) {
            // A small blob, in memory or a pack: give it a file of its own.
            if let Some(bytes) = self.bytes_now(&digest) {
                let local = self.local.clone();
                tokio::task::spawn_blocking(move || local.insert_verified(&digest, &bytes))
                    .await
                    .map_err(|e| Error::Internal(format!("storing {digest}: {e}")))??;
            }
        }
        self.file_now(&digest)?.ok_or_else(|| Error::Internal(format!("fetched blob {digest} left the cache at once")))
    }

    /// Makes a blob local (fetched once, verified): small ones in memory (on disk soon),
    /// large ones in the disk cache. `parent` is the Directory it was found in: once two files
    /// of one directory are read, the directory's other small files come along in one batch.
    pub async fn load(self: &Arc<Self>, digest: Digest, remote: &Arc<Remote>, parent: Option<Digest>) -> Result<()> {
        if self.is_local(&digest) {
            return Ok(());
        }
        self.metrics.add("casfs_blob_cache_misses_total", 1);
        let this = self.clone();
        let remote = remote.clone();
        self.blob_flight
            .run(digest, move || {
                async move {
                    this.with_deadline(digest, this.fetch_blob(digest, &remote.cas, parent))
                        .await
                        .inspect_err(|e| this.note_failure(e))
                }
                .boxed()
            })
            .await
            .map_err(shared(digest))
    }

    async fn fetch_blob(&self, digest: Digest, remote: &SharedCas, parent: Option<Digest>) -> Result<()> {
        let started = Instant::now();
        if digest.size() <= SMALL_BLOB {
            let mut wanted = vec![digest];
            if let Some(p) = parent.filter(|_| self.cfg.batch_siblings) {
                wanted.extend(self.siblings_to_batch(&p, &digest));
            }
            let results = remote.read_many(&wanted).await?;
            let mut mine = Err(Error::MissingBlob(digest));
            for (d, r) in results {
                let r = match r {
                    Ok(bytes) => {
                        self.metrics.add("casfs_fetch_blobs_total", 1);
                        self.metrics.add("casfs_fetch_bytes_total", bytes.len() as u64);
                        // `read_many` returns verified bytes only.
                        self.hot.insert(d, bytes);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                if d == digest {
                    mine = r;
                } else if let Err(e) = r {
                    tracing::debug!(digest = %d, error = %e, "sibling prefetch failed");
                }
            }
            self.metrics.histogram("casfs_fetch_seconds{kind=\"small\"}").observe(started.elapsed());
            return mine;
        }
        let mut attempt = 0;
        loop {
            let res = async {
                let stream = remote.read_stream(&digest, 0, 0).await?;
                let bytes = self.metrics.counter("casfs_fetch_bytes_total");
                let counted = stream
                    .inspect(move |c| {
                        if let Ok(b) = c {
                            bytes.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                    .boxed();
                // Into memory while it is hashed, served once verified, on disk soon after;
                // straight to the disk cache when memory is short.
                let Some(room) = self.large.reserve(digest.size()) else {
                    return self.local.write_stream(&digest, counted).await;
                };
                let file = match memory_file(c"casfs-blob") {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(error = %e, "no memory file; writing to the disk cache first");
                        return self.local.write_stream(&digest, counted).await;
                    }
                };
                let file = crate::cas::pipe::write_verified(&digest, counted, file).await?;
                self.large.insert(room, digest, file);
                Ok(())
            }
            .await;
            match res {
                Err(e) if e.is_transient() && attempt < 3 => attempt += 1,
                other => {
                    if other.is_ok() {
                        self.metrics.add("casfs_fetch_blobs_total", 1);
                        self.metrics.histogram("casfs_fetch_seconds{kind=\"large\"}").observe(started.elapsed());
                    }
                    return other;
                }
            }
        }
    }

    /// A whole (verified) message blob such as an Action, Command or Tree, through the local
    /// cache.
    pub async fn message(self: &Arc<Self>, digest: Digest, remote: &Arc<Remote>) -> Result<Vec<u8>> {
        if digest.is_empty_blob() {
            return Ok(Vec::new());
        }
        self.load(digest, remote, None).await?;
        if let Some(b) = self.bytes_now(&digest) {
            return Ok(b.to_vec());
        }
        let file = self.file_now(&digest)?.ok_or(Error::MissingBlob(digest))?;
        let mut buf = vec![0u8; digest.size() as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0)
            .map_err(|e| Error::io(format!("reading cached {digest}"), e))?;
        Ok(buf)
    }

    /// Registers a Directory that arrived inside another message (a Tree): stored in the
    /// local cache (its digest was computed from these bytes) and the Directory cache.
    pub async fn insert_dir(&self, digest: Digest, bytes: bytes::Bytes, dir: Directory) -> Result<()> {
        crate::cas::verify(&digest, &bytes)?;
        self.hot.insert(digest, bytes);
        self.dirs.insert(digest, Arc::new(dir));
        Ok(())
    }

    /// Whether `remote` holds a blob (for lookups that must not answer for absent content).
    pub async fn exists(&self, digest: Digest, remote: &Remote) -> Result<bool> {
        if self.is_local(&digest) {
            return Ok(true);
        }
        let missing = self.with_deadline(digest, remote.cas.find_missing(&[digest])).await?;
        Ok(missing.is_empty())
    }

    /// The cached result of an action in `remote`'s action cache, if any.
    pub async fn action_result(
        &self,
        action: Digest,
        remote: &Remote,
    ) -> Result<Option<crate::proto::reapi::ActionResult>> {
        let ac = remote.ac.as_ref().ok_or_else(|| Error::NotFound("no action cache".into()))?;
        self.metrics.add("casfs_fetch_action_results_total", 1);
        self.with_deadline(action, ac.get_action_result(&action)).await
    }

    /// The other small, not yet local files of `parent`, if this is at least the second file
    /// read from it.
    fn siblings_to_batch(&self, parent: &Digest, me: &Digest) -> Vec<Digest> {
        if self.reads_per_dir.get(parent).is_none() {
            self.reads_per_dir.insert(*parent, ());
            return Vec::new();
        }
        let Some(dir) = self.dirs.get(parent) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut seen = std::collections::HashSet::from([*me]);
        for f in &dir.files {
            let d = f.digest;
            if d.size() > SMALL_BLOB || d.is_empty_blob() || !seen.insert(d) || self.is_local(&d) {
                continue;
            }
            if bytes + d.size() > SIBLING_BATCH_BYTES || out.len() >= SIBLING_BATCH_FILES {
                break;
            }
            bytes += d.size();
            out.push(d);
        }
        if !out.is_empty() {
            self.metrics.add("casfs_sibling_batches_total", 1);
        }
        out
    }
}
