//! The filesystem core over an in-memory store, without a kernel: lookups, listings, reads,
//! xattrs, inode lifetimes, single-flight fetches and deadlines.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use casfs::cache::{CacheConfig, LocalCache};
use casfs::cas::{ByteStream, Cas, MemoryStore};
use casfs::digest::Digest;
use casfs::error::Result;
use casfs::fs::ROOT;
use casfs::fs::{CasFs, FetchConfig, Fetcher, FsConfig, Kind, Node, Remote};
use casfs::metrics::Metrics;
use casfs::tree::{DirEntry, Directory, FileEntry, SymlinkEntry};

use crate::common::*;

/// A store that counts reads and can be made slow.
struct Counting {
    inner: MemoryStore,
    reads: std::sync::atomic::AtomicU64,
    delay: Duration,
}

#[async_trait::async_trait]
impl Cas for Counting {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }
    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ByteStream> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.read_stream(digest, offset, limit).await
    }
    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> Result<()> {
        self.inner.write_stream(digest, data).await
    }
}

struct Fixture {
    fs: Arc<CasFs>,
    remote: Arc<Counting>,
    file: Digest,
    big: Digest,
    cache: tempfile::TempDir,
}

impl Fixture {
    /// True when a blob has a file of its own in the local disk cache.
    fn on_disk(&self, d: &Digest) -> bool {
        let hex = d.hash_hex();
        self.cache.path().join("cas").join(&hex[..2]).join(&hex).exists()
    }
}

async fn fixture(delay: Duration, deadline: Duration) -> TestResult<Fixture> {
    fixture_with(delay, FetchConfig { deadline, ..FetchConfig::default() }).await
}

async fn fixture_with(delay: Duration, cfg: FetchConfig) -> TestResult<Fixture> {
    fixture_cached(delay, cfg, None).await
}

/// A fixture whose cache holds at most `mem_large` bytes of large blobs in memory.
async fn fixture_cached(delay: Duration, cfg: FetchConfig, mem_large: Option<u64>) -> TestResult<Fixture> {
    let remote = Arc::new(Counting { inner: MemoryStore::new(), reads: Default::default(), delay });
    let file = Bytes::from_static(b"contents\n");
    let fd = Digest::of_bytes(&file);
    let big = Bytes::from(pseudo_random(9, 700_000));
    let bd = Digest::of_bytes(&big);
    remote.inner.write(&fd, file).await?;
    remote.inner.write(&bd, big).await?;
    let sub = Directory {
        files: vec![FileEntry { name: "same".into(), digest: fd, executable: true }],
        ..Default::default()
    };
    let (sd, sb) = sub.encode();
    remote.inner.write(&sd, sb.into()).await?;
    let root = Directory {
        files: vec![
            FileEntry { name: "big".into(), digest: bd, executable: false },
            FileEntry { name: "f".into(), digest: fd, executable: false },
            FileEntry { name: "g".into(), digest: fd, executable: false },
        ],
        dirs: vec![DirEntry { name: "sub".into(), digest: sd }],
        symlinks: vec![SymlinkEntry { name: "l".into(), target: "../outside".into() }],
    };
    let (rd, rb) = root.encode();
    remote.inner.write(&rd, rb.into()).await?;
    let cache = tempfile::tempdir()?;
    let mut cache_cfg = CacheConfig::new(cache.path(), 0);
    cache_cfg.mem_large_bytes = mem_large.unwrap_or(cache_cfg.mem_large_bytes);
    let metrics = Metrics::new();
    let local = LocalCache::open(&cache_cfg, &metrics)?;
    let fetcher = Fetcher::new(local, cfg, metrics);
    let root = Node::Dir { digest: rd, remote: Remote::new(remote.clone(), None) };
    let fs = CasFs::new(root, fetcher, FsConfig::default());
    Ok(Fixture { fs, remote, file: fd, big: bd, cache })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_listings_reads_and_xattrs() -> TestResult {
    let fx = fixture(Duration::ZERO, Duration::from_secs(10)).await?;
    let fs = &fx.fs;
    let f = fs.lookup(ROOT, "f").await?;
    let g = fs.lookup(ROOT, "g").await?;
    assert_eq!(f.ino, g.ino, "same content and mode share an inode");
    assert_eq!((f.kind, f.size, f.perm), (Kind::File, 9, 0o444));
    let sub = fs.lookup(ROOT, "sub").await?;
    let same = fs.lookup(sub.ino, "same").await?;
    assert_ne!(same.ino, f.ino, "executable copy is a different inode");
    assert_eq!(same.perm, 0o555);
    let l = fs.lookup(ROOT, "l").await?;
    assert_eq!(&*fs.readlink(l.ino)?, "../outside");
    assert_eq!(fs.lookup(ROOT, "missing").await.expect_err("missing").errno(), libc::ENOENT);

    let dir = fs.listing(ROOT).await?;
    let names: Vec<String> = fs.list(ROOT, &dir, 0)?.into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(names, [".", "..", "big", "f", "g", "sub", "l"]);
    let rest: Vec<String> = fs.list(ROOT, &dir, 4)?.into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(rest, ["g", "sub", "l"]);

    let file = fs.fetch_backing(f.ino).await?;
    assert_eq!(Digest::of_bytes(&std::fs::read(format!("/proc/self/fd/{}", file.as_raw_fd()))?), fx.file);
    assert_eq!(fs.read(f.ino, 2, 100).await?, b"ntents\n");
    assert_eq!(fs.read(f.ino, 9, 100).await?, b"");
    assert_eq!(fs.getxattr(f.ino, "user.reapi.digest")?, Some(fx.file.to_string().into_bytes()));
    assert_eq!(fs.getxattr(f.ino, "user.sha256")?, Some(fx.file.hash_bytes().to_vec()));
    assert_eq!(fs.getxattr(f.ino, "user.other")?, None);
    assert_eq!(fs.listxattr(l.ino)?, b"");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_keeps_the_inode_table_bounded() -> TestResult {
    let fx = fixture(Duration::ZERO, Duration::from_secs(10)).await?;
    let fs = &fx.fs;
    let before = fs.inode_count();
    for _ in 0..100 {
        let a = fs.lookup(ROOT, "sub").await?;
        let b = fs.lookup(a.ino, "same").await?;
        fs.forget(b.ino, 1);
        fs.forget(a.ino, 1);
    }
    assert_eq!(fs.inode_count(), before, "forgotten inodes stayed in the table");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_fetch_and_slow_fetches_hit_the_deadline() -> TestResult {
    let fx = fixture(Duration::from_millis(300), Duration::from_secs(10)).await?;
    let fs = fx.fs.clone();
    let big = fs.lookup(ROOT, "big").await?;
    let reads_before = fx.remote.reads.load(std::sync::atomic::Ordering::SeqCst);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let fs = fs.clone();
            tokio::spawn(async move { fs.fetch_backing(big.ino).await })
        })
        .collect();
    for t in tasks {
        let f = t.await??;
        let mut buf = vec![0u8; fx.big.size() as usize];
        f.read_exact_at(&mut buf, 0)?;
        assert_eq!(Digest::of_bytes(&buf), fx.big);
    }
    let reads = fx.remote.reads.load(std::sync::atomic::Ordering::SeqCst) - reads_before;
    assert_eq!(reads, 1, "16 concurrent readers caused {reads} fetches");

    let slow = fixture(Duration::from_secs(30), Duration::from_millis(200)).await?;
    let err = slow.fs.lookup(ROOT, "f").await.expect_err("deadline");
    assert_eq!(err.errno(), libc::EIO, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_wait_in_memory_within_the_budget_and_go_to_disk_beyond_it() -> TestResult {
    // No memory for large blobs: each is in the disk cache before anyone reads it.
    let fx = fixture_cached(Duration::ZERO, FetchConfig::default(), Some(0)).await?;
    let big = fx.fs.lookup(ROOT, "big").await?;
    fx.fs.load_file(big.ino).await?;
    assert!(fx.on_disk(&fx.big), "without memory the blob goes to the disk first");
    assert_eq!(Digest::of_bytes(&fx.fs.read(big.ino, 0, 1 << 20).await?), fx.big);

    // With room: served from a memory file at once. The disk copy is made impossible (a file
    // where its shard folder goes), so the background writer cannot race the check: a blob the
    // disk refuses stays readable from memory.
    let fx = fixture_cached(Duration::ZERO, FetchConfig::default(), Some(1 << 30)).await?;
    let hex = fx.big.hash_hex();
    let shard = fx.cache.path().join("cas").join(&hex[..2]);
    let _ = std::fs::remove_dir_all(&shard);
    std::fs::write(&shard, b"not a folder")?;
    let big = fx.fs.lookup(ROOT, "big").await?;
    let file = fx.fs.fetch_backing(big.ino).await?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    assert!(link.to_string_lossy().starts_with("/memfd:casfs-blob"), "backing file is {link:?}");
    fx.fs.fetcher().cache().flush();
    assert!(!fx.on_disk(&fx.big), "the disk refused the copy");
    assert_eq!(Digest::of_bytes(&fx.fs.read(big.ino, 0, 1 << 20).await?), fx.big);

    // With room and a working disk: in the disk cache once flushed.
    let fx = fixture_cached(Duration::ZERO, FetchConfig::default(), Some(1 << 30)).await?;
    let big = fx.fs.lookup(ROOT, "big").await?;
    assert_eq!(Digest::of_bytes(&fx.fs.read(big.ino, 0, 1 << 20).await?), fx.big);
    fx.fs.fetcher().cache().flush();
    assert!(fx.on_disk(&fx.big), "flush leaves the blob in the disk cache");
    assert_eq!(Digest::of_bytes(&fx.fs.read(big.ino, 0, 1 << 20).await?), fx.big);
    Ok(())
}
