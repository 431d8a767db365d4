//! Lazy, verified fetching for the filesystem: what to fetch, when and from where. One fetch
//! per digest however many readers wait, deadlines, a bounded cache of validated
//! Directories, and batched fetching of small sibling files; the bytes land in the
//! [`LocalCache`], which owns every tier they live in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;

use crate::cache::LocalCache;
pub use crate::cache::SMALL_BLOB;
use crate::cas::{SharedActionCache, SharedCas};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tree::Directory;

mod chunked;

/// Most bytes one sibling batch brings in.
const SIBLING_BATCH_BYTES: u64 = 3 << 20;
/// Granularity of the in-flight bound.
const IN_FLIGHT_UNIT: u64 = 4096;
/// Most files one sibling batch brings in.
const SIBLING_BATCH_FILES: usize = 2048;

/// How the fetcher behaves.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// How long a fetch may go without progress before it is retried or the reader gets EIO:
    /// the whole of a Directory or small-blob fetch; for a large blob, the wait for its next
    /// bytes (a large blob reads over a slow link as long as bytes keep coming, and a broken
    /// stream resumes where it stopped).
    pub deadline: Duration,
    /// Resumed reads in a row without progress before a large-blob fetch fails.
    pub retries: u32,
    /// Weight bound of the Directory cache, in bytes of encoded Directories.
    pub dir_cache_bytes: u64,
    /// Fetch the small files of a directory together once a second one is read.
    pub batch_siblings: bool,
    /// Bytes of small-blob fetches in flight at once (a response and its copies count
    /// twice); past this, fetches wait their turn.
    pub in_flight_bytes: u64,
    /// Listing a directory fetches the Directories below it in one stream (GetTree, or
    /// batches): at most this many bytes of encoded Directories per listed directory (0: off).
    pub tree_prefetch_bytes: u64,
    /// ... and at most this many Directories.
    pub tree_prefetch_dirs: usize,
    /// A recognised scan (files of a directory read in order, or directories visited in
    /// order) fetches the small files of the next directories ahead of the reader, up to this
    /// many bytes (0: off).
    pub scan_ahead_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            deadline: Duration::from_secs(30),
            retries: 5,
            dir_cache_bytes: 256 << 20,
            batch_siblings: true,
            in_flight_bytes: 128 << 20,
            // Off unless asked for (`casfs mount` does): an executor's input root is read
            // sparsely, and only what its command touches should cross the link.
            tree_prefetch_bytes: 0,
            tree_prefetch_dirs: 100_000,
            scan_ahead_bytes: 0,
        }
    }
}

type Flight<V> = Shared<BoxFuture<'static, std::result::Result<V, Arc<Error>>>>;

/// `bytes` in units of the in-flight bound (at least one).
fn in_flight_units(bytes: u64) -> u32 {
    bytes.div_ceil(IN_FLIGHT_UNIT).clamp(1, u32::MAX as u64 >> 4) as u32
}

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

/// Fetches Directories and file contents on demand, verified, into the local cache.
pub struct Fetcher {
    cache: Arc<LocalCache>,
    dirs: moka::sync::Cache<Digest, Arc<Directory>>,
    dir_flight: SingleFlight<Arc<Directory>>,
    blob_flight: SingleFlight<()>,
    reads_per_dir: moka::sync::Cache<Digest, ()>,
    /// Units of [`IN_FLIGHT_UNIT`] bytes that small fetches may have in flight.
    in_flight: tokio::sync::Semaphore,
    cfg: FetchConfig,
    metrics: Arc<Metrics>,
    failures: Mutex<FetchFailures>,
    /// Blobs a prefetch batch is bringing: a reader of one waits for the batch (it turns
    /// true when the batch is done) rather than fetching the blob a second time.
    prefetching: Mutex<HashMap<Digest, tokio::sync::watch::Receiver<bool>>>,
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
    /// A fetcher reading into `cache` from the remotes its callers name.
    pub fn new(cache: Arc<LocalCache>, cfg: FetchConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let dirs = moka::sync::Cache::builder()
            .max_capacity(cfg.dir_cache_bytes)
            .weigher(|_, d: &Arc<Directory>| (64 + 96 * d.len()).min(u32::MAX as usize) as u32)
            .build();
        Arc::new(Fetcher {
            cache,
            dirs,
            dir_flight: SingleFlight::new(),
            blob_flight: SingleFlight::new(),
            reads_per_dir: moka::sync::Cache::new(100_000),
            in_flight: tokio::sync::Semaphore::new(in_flight_units(cfg.in_flight_bytes) as usize),
            cfg,
            metrics,
            failures: Mutex::new(FetchFailures::default()),
            prefetching: Mutex::new(HashMap::new()),
        })
    }

    /// The local cache the fetched bytes land in.
    pub fn cache(&self) -> &Arc<LocalCache> {
        &self.cache
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How the fetcher behaves.
    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// A Directory in memory, not counted as a hit or miss (for prefetch planning).
    pub fn peek_dir(&self, digest: &Digest) -> Option<Arc<Directory>> {
        self.dirs.get(digest)
    }

    /// Keeps a Directory that a prefetch validated: `digest` is the hash of `bytes`, its
    /// encoding, and a trusted parent names it. The bytes go to the local cache too, so a
    /// later mount over it needs no server for them.
    pub fn insert_prefetched_dir(&self, digest: Digest, bytes: bytes::Bytes, dir: Directory) {
        self.cache.insert_verified_cold(digest, bytes);
        self.dirs.insert(digest, Arc::new(dir));
    }

    /// Fetches small blobs ahead of their readers in as few batches as the remote allows,
    /// through the in-flight bound and the deadline, into the cache: only verified bytes are
    /// kept, and a blob that fails (absent, or bytes that do not match) is left for its
    /// reader to fetch, and fail, alone. Returns how many arrived.
    pub async fn prefetch_small(&self, wanted: Vec<Digest>, remote: &SharedCas) -> usize {
        let wanted: Vec<Digest> = wanted.into_iter().filter(|d| !self.cache.contains(d)).collect();
        let Some(first) = wanted.first().copied() else { return 0 };
        let (done, waiting) = tokio::sync::watch::channel(false);
        {
            let mut p = self.prefetching.lock().unwrap();
            for d in &wanted {
                p.entry(*d).or_insert_with(|| waiting.clone());
            }
        }
        let arrived = self.prefetch_batch(first, &wanted, remote).await;
        {
            let mut p = self.prefetching.lock().unwrap();
            for d in &wanted {
                if p.get(d).is_some_and(|rx| rx.same_channel(&waiting)) {
                    p.remove(d);
                }
            }
        }
        let _ = done.send(true);
        arrived
    }

    /// Waits for room to hold a batch read of `wanted` in flight. A response is held twice
    /// while its blobs are copied out, so both copies count.
    async fn batch_turn(&self, wanted: &[Digest]) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let bytes: u64 = wanted.iter().map(|d| 2 * d.size()).sum();
        let units = in_flight_units(bytes).min(in_flight_units(self.cfg.in_flight_bytes));
        self.in_flight.acquire_many(units).await.map_err(|_| Error::Internal("the fetcher was shut down".into()))
    }

    async fn prefetch_batch(&self, first: Digest, wanted: &[Digest], remote: &SharedCas) -> usize {
        let Ok(_turn) = self.batch_turn(wanted).await else { return 0 };
        let results = match self.with_deadline(first, remote.read_many(wanted)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, blobs = wanted.len(), "prefetch failed");
                return 0;
            }
        };
        let mut arrived = 0;
        for (d, r) in results {
            match r {
                Ok(bytes) => {
                    self.metrics.add("casfs_fetch_bytes_total", bytes.len() as u64);
                    // `read_many` returns verified bytes only.
                    self.cache.insert_verified(d, bytes);
                    arrived += 1;
                }
                Err(e) => tracing::debug!(digest = %d, error = %e, "prefetched blob refused"),
            }
        }
        self.metrics.add("casfs_scan_prefetch_blobs_total", arrived as u64);
        self.metrics.add("casfs_scan_prefetch_batches_total", 1);
        arrived
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
        // The decoded Directory is what stays in memory, not its bytes.
        let (bytes, fresh) = if let Some(b) = self.cache.bytes_once(&digest) {
            (b, false)
        } else if self.cache.contains(&digest) {
            (crate::cas::Cas::read(self.cache.as_ref(), &digest).await?, false)
        } else {
            let started = Instant::now();
            let bytes = remote.cas.read(&digest).await?;
            self.metrics.add("casfs_fetch_dirs_total", 1);
            self.metrics.add("casfs_fetch_bytes_total", bytes.len() as u64);
            self.metrics.histogram("casfs_fetch_seconds{kind=\"dir\"}").observe(started.elapsed());
            (bytes, true)
        };
        let cache = self.cache.clone();
        let store_and_decode = move || -> Result<Arc<Directory>> {
            if fresh {
                // `read` returned verified bytes.
                cache.insert_verified_cold(digest, bytes.clone());
            }
            Ok(Arc::new(Directory::decode(&digest, &bytes)?))
        };
        if digest.size() <= SMALL_BLOB {
            return store_and_decode();
        }
        // A large Directory (a folder of 100k entries is ~8 MB) is decoded and written off the
        // runtime's threads, so lookups elsewhere in the tree are answered meanwhile.
        tokio::task::spawn_blocking(store_and_decode)
            .await
            .map_err(|e| Error::Internal(format!("decoding {digest}: {e}")))?
    }

    async fn with_deadline<T>(&self, digest: Digest, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.cfg.deadline, fut).await {
            Ok(r) => r,
            Err(_) => {
                Err(Error::DeadlineExceeded(format!("fetching {digest} took longer than {:?}", self.cfg.deadline)))
            }
        }
    }

    /// The bytes of a small blob at hand now (no fetch).
    pub fn bytes_now(&self, digest: &Digest) -> Option<bytes::Bytes> {
        self.cache.bytes_now(digest)
    }

    /// An open file holding a blob's verified bytes, if it has one now (no fetch).
    pub fn file_now(&self, digest: &Digest) -> Result<Option<Arc<std::fs::File>>> {
        self.cache.file_now(digest)
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
        if let Some(f) = self.cache.file_now(&digest)? {
            return Ok(f);
        }
        self.load(digest, remote, parent).await?;
        self.cache
            .file(&digest)
            .await?
            .ok_or_else(|| Error::Internal(format!("fetched blob {digest} left the cache at once")))
    }

    /// Makes a blob local (fetched once, verified): small ones in memory (on disk soon),
    /// large ones in the disk cache. `parent` is the Directory it was found in: once two files
    /// of one directory are read, the directory's other small files come along in one batch.
    pub async fn load(self: &Arc<Self>, digest: Digest, remote: &Arc<Remote>, parent: Option<Digest>) -> Result<()> {
        if self.cache.ready(&digest) {
            return Ok(());
        }
        let this = self.clone();
        let remote = remote.clone();
        self.blob_flight
            .run(digest, move || {
                async move {
                    // A blob file of an earlier life is hashed once before it is served.
                    if this.cache.check(&digest).await? {
                        return Ok(());
                    }
                    // A prefetch on its way brings it sooner than a fetch of its own would.
                    let batch = this.prefetching.lock().unwrap().get(&digest).cloned();
                    if let Some(mut rx) = batch {
                        let _ = rx.wait_for(|done| *done).await;
                        if this.cache.ready(&digest) {
                            return Ok(());
                        }
                    }
                    this.metrics.add("casfs_blob_cache_misses_total", 1);
                    this.fetch_blob(digest, &remote.cas, parent).await.inspect_err(|e| this.note_failure(e))
                }
                .boxed()
            })
            .await
            .map_err(shared(digest))
    }

    /// Fetches a blob: a small one (with its siblings) in one batch under the whole-fetch
    /// deadline, a large one streamed under the progress deadline.
    async fn fetch_blob(&self, digest: Digest, remote: &SharedCas, parent: Option<Digest>) -> Result<()> {
        if digest.size() > SMALL_BLOB {
            return self.fetch_large(digest, remote).await;
        }
        let started = Instant::now();
        let mut wanted = vec![digest];
        if let Some(p) = parent.filter(|_| self.cfg.batch_siblings) {
            wanted.extend(self.siblings_to_batch(&p, &digest));
        }
        let _turn = self.batch_turn(&wanted).await?;
        let results = self.with_deadline(digest, remote.read_many(&wanted)).await?;
        let mut mine = Err(Error::MissingBlob(digest));
        for (d, r) in results {
            let r = match r {
                Ok(bytes) => {
                    self.metrics.add("casfs_fetch_blobs_total", 1);
                    self.metrics.add("casfs_fetch_bytes_total", bytes.len() as u64);
                    // `read_many` returns verified bytes only.
                    self.cache.insert_verified(d, bytes);
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
        mine
    }

    /// Streams a large blob into the cache. The deadline bounds each wait for bytes, not the
    /// transfer: a broken or stalled read resumes at the first byte not yet received, so the
    /// cache appends to what it is writing and hashes the whole blob once (see
    /// [`crate::cas::resume`]).
    async fn fetch_large(&self, digest: Digest, remote: &SharedCas) -> Result<()> {
        let started = Instant::now();
        if self.fetch_chunked(digest, remote).await? {
            self.metrics.add("casfs_fetch_blobs_total", 1);
            return Ok(());
        }
        let cas = remote.clone();
        let open: crate::cas::resume::Open<'static> = Box::new(move |offset| {
            let cas = cas.clone();
            async move { cas.read_stream(&digest, offset, 0).await }.boxed()
        });
        let policy = crate::cas::resume::Resume { idle: self.cfg.deadline, retries: self.cfg.retries };
        let resumes = self.metrics.counter("casfs_fetch_resumes_total");
        let on_resume = move |_| {
            resumes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let bytes = self.metrics.counter("casfs_fetch_bytes_total");
        let counted = crate::cas::resume::resuming(digest, open, policy, on_resume)
            .inspect(move |c| {
                if let Ok(b) = c {
                    bytes.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .boxed();
        self.cache.insert_stream(&digest, counted).await?;
        self.metrics.add("casfs_fetch_blobs_total", 1);
        self.metrics.histogram("casfs_fetch_seconds{kind=\"large\"}").observe(started.elapsed());
        Ok(())
    }

    /// A whole (verified) message blob such as an Action, Command or Tree, through the local
    /// cache.
    pub async fn message(self: &Arc<Self>, digest: Digest, remote: &Arc<Remote>) -> Result<Vec<u8>> {
        if digest.is_empty_blob() {
            return Ok(Vec::new());
        }
        self.load(digest, remote, None).await?;
        if let Some(b) = self.cache.bytes_now(&digest) {
            return Ok(b.to_vec());
        }
        let file = self.cache.file_now(&digest)?.ok_or(Error::MissingBlob(digest))?;
        let mut buf = vec![0u8; digest.size() as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0)
            .map_err(|e| Error::io(format!("reading cached {digest}"), e))?;
        Ok(buf)
    }

    /// Registers a Directory that arrived inside another message (a Tree): stored in the
    /// local cache (its digest was computed from these bytes) and the Directory cache.
    pub async fn insert_dir(&self, digest: Digest, bytes: bytes::Bytes, dir: Directory) -> Result<()> {
        crate::cas::verify(&digest, &bytes)?;
        self.cache.insert_verified_cold(digest, bytes);
        self.dirs.insert(digest, Arc::new(dir));
        Ok(())
    }

    /// Whether `remote` holds a blob (for lookups that must not answer for absent content).
    pub async fn exists(&self, digest: Digest, remote: &Remote) -> Result<bool> {
        if self.cache.contains(&digest) {
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
        let pending = self.prefetching.lock().unwrap();
        for f in &dir.files {
            let d = f.digest;
            if d.size() > SMALL_BLOB
                || d.is_empty_blob()
                || !seen.insert(d)
                || self.cache.contains(&d)
                || pending.contains_key(&d)
            {
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
