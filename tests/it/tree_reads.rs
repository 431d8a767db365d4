//! Whole-tree reads over a real `casfs serve` and a real FUSE mount: listing a directory
//! prefetches the Directories below it within a budget, and a scan prefetches the next
//! directories' small files in batches, verified (a lying server fails only its file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use casfs::cas::{ByteStream, Cas, MemoryStore};
use casfs::digest::Digest;

use crate::common::*;
use crate::mount::{http_get, MountProcess};

/// A mount of a freshly uploaded tree, with its metrics endpoint.
struct Mounted {
    _tmp: tempfile::TempDir,
    _server: ServeProcess,
    mount: MountProcess,
    metrics: String,
}

impl Mounted {
    /// Uploads what `fill` writes into a folder, then mounts it with `extra` flags.
    fn new(fill: impl FnOnce(&Path) -> TestResult, extra: &[&str]) -> TestResult<Self> {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src)?;
        fill(&src)?;
        let storage = tmp.path().join("storage");
        let server = ServeProcess::start(&storage)?;
        let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
        assert_eq!(code, 0, "{err}");
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let mut args = vec!["--metrics-listen", metrics.as_str()];
        args.extend_from_slice(extra);
        let mnt = tmp.path().join("mnt");
        let mount = MountProcess::start(out.trim(), &mnt, &server.url, &tmp.path().join("cache"), &args)?;
        Ok(Mounted { _server: server, mount, metrics, _tmp: tmp })
    }

    fn mnt(&self) -> &Path {
        &self.mount.mountpoint
    }

    /// A metric of the mount daemon (0 while absent).
    fn metric(&self, name: &str) -> TestResult<u64> {
        let text = http_get(&self.metrics, "/metrics")?;
        Ok(metric(&text, name).unwrap_or(0))
    }

    /// Waits (bounded) until a counter reaches `n`; its final value.
    fn wait_for(&self, name: &str, n: u64) -> TestResult<u64> {
        for _ in 0..600 {
            let v = self.metric(name)?;
            if v >= n {
                return Ok(v);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(format!("{name} never reached {n}:\n{}", http_get(&self.metrics, "/metrics")?).into())
    }
}

/// Every directory below `p`, by listing (readdir and lookups), and the files found.
fn walk(p: &Path, dirs: &mut usize, files: &mut Vec<PathBuf>) -> TestResult {
    let mut entries: Vec<_> = std::fs::read_dir(p)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let t = e.file_type()?;
        if t.is_dir() {
            *dirs += 1;
            walk(&e.path(), dirs, files)?;
        } else if t.is_file() {
            files.push(e.path());
        }
    }
    Ok(())
}

/// `top` folders of `mid` folders of `files` small files each (distinct contents).
fn deep(top: usize, mid: usize, files: usize) -> impl FnOnce(&Path) -> TestResult {
    move |src| {
        for a in 0..top {
            for b in 0..mid {
                let d = src.join(format!("a{a:03}/b{b:03}"));
                std::fs::create_dir_all(&d)?;
                for f in 0..files {
                    std::fs::write(d.join(format!("f{f:03}")), format!("a{a} b{b} f{f}\n"))?;
                }
            }
        }
        Ok(())
    }
}

#[test]
fn a_readdir_at_the_root_makes_lookups_below_cost_no_fetches() -> TestResult {
    require_fuse!();
    let m = Mounted::new(deep(12, 6, 2), &[])?;
    let top = std::fs::read_dir(m.mnt())?.count();
    assert_eq!(top, 12);
    m.wait_for("casfs_tree_prefetch_done_total", 1)?;
    // The 12 + 72 Directories below the root came in one stream.
    assert_eq!(m.metric("casfs_tree_prefetch_dirs_total")?, 84);
    assert_eq!(m.metric("casfs_tree_prefetch_runs_total{how=\"get_tree\"}")?, 1);
    let fetched = m.metric("casfs_fetch_dirs_total")?;
    assert_eq!(fetched, 1, "only the root was fetched alone");
    let (mut dirs, mut files) = (0, Vec::new());
    walk(m.mnt(), &mut dirs, &mut files)?;
    assert_eq!((dirs, files.len()), (84, 144));
    assert_eq!(m.metric("casfs_fetch_dirs_total")?, fetched, "a lookup below fetched a Directory");
    assert_eq!(std::fs::read_to_string(m.mnt().join("a011/b005/f001"))?, "a11 b5 f1\n");
    // Listing again asks for nothing more.
    assert_eq!(m.metric("casfs_tree_prefetch_done_total")?, 1);
    Ok(())
}

#[test]
fn the_budget_bounds_a_huge_tree() -> TestResult {
    require_fuse!();
    for (flags, what) in [(["--tree-prefetch-dirs", "50"], "count"), (["--tree-prefetch-bytes", "4K"], "bytes")] {
        let m = Mounted::new(deep(300, 1, 1), &flags)?;
        assert_eq!(std::fs::read_dir(m.mnt())?.count(), 300);
        m.wait_for("casfs_tree_prefetch_done_total", 1)?;
        assert_eq!(m.metric("casfs_tree_prefetch_truncated_total")?, 1, "{what}");
        let kept = m.metric("casfs_tree_prefetch_dirs_total")?;
        assert!(kept > 0, "{what}: nothing prefetched");
        if what == "count" {
            assert!(kept <= 50, "{what}: {kept} Directories kept");
        } else {
            assert!(m.metric("casfs_tree_prefetch_bytes_total")? <= 4096, "{what}");
        }
        // What the budget left out is fetched on demand.
        let (mut dirs, mut files) = (0, Vec::new());
        walk(m.mnt(), &mut dirs, &mut files)?;
        assert_eq!((dirs, files.len()), (600, 300), "{what}");
        assert_eq!(std::fs::read_to_string(m.mnt().join("a299/b000/f000"))?, "a299 b0 f0\n");
    }
    Ok(())
}

/// `n` folders of 50 small files, read as `find | xargs cat` does: folder by folder, in order.
fn scan(mnt: &Path, n: usize) -> Vec<(String, std::io::Result<Vec<u8>>)> {
    let mut out = Vec::new();
    for d in 0..n {
        for f in 0..50 {
            let name = format!("d{d:03}/f{f:03}");
            out.push((name.clone(), std::fs::read(mnt.join(&name))));
        }
    }
    out
}

fn flat(n: usize) -> impl FnOnce(&Path) -> TestResult {
    move |src| {
        for d in 0..n {
            let dir = src.join(format!("d{d:03}"));
            std::fs::create_dir_all(&dir)?;
            for f in 0..50 {
                std::fs::write(dir.join(format!("f{f:03}")), format!("d{d} f{f}\n"))?;
            }
        }
        Ok(())
    }
}

#[test]
fn a_scan_prefetches_the_next_directories_small_files_in_batches() -> TestResult {
    require_fuse!();
    let m = Mounted::new(flat(40), &[])?;
    for (name, r) in scan(m.mnt(), 40) {
        let (d, f) = name.split_once('/').ok_or("name")?;
        assert_eq!(r?, format!("d{} f{}\n", &d[1..].parse::<u32>()?, &f[1..].parse::<u32>()?).into_bytes());
    }
    let batches = m.wait_for("casfs_scan_prefetch_batches_total", 1)?;
    let blobs = m.metric("casfs_scan_prefetch_blobs_total")?;
    eprintln!("scan of 2,000 files: {blobs} prefetched in {batches} batches");
    assert!(blobs >= 50, "{blobs} blobs prefetched");
    assert!(blobs / batches >= 25, "batches of {} blobs", blobs / batches);
    Ok(())
}

/// The expected content of `dNNN/fNNN` in [`flat`].
fn flat_content(name: &str) -> TestResult<Vec<u8>> {
    let (d, f) = name.split_once('/').ok_or("name")?;
    Ok(format!("d{} f{}\n", &d[1..].parse::<u32>()?, &f[1..].parse::<u32>()?).into_bytes())
}

#[test]
fn a_scan_after_a_listing_reads_the_files_from_the_page_cache() -> TestResult {
    require_fuse!();
    let m = Mounted::new(flat(40), &[])?;
    // As `find | xargs cat`: every directory listed (readdirplus), then the files in order.
    let (mut dirs, mut files) = (0, Vec::new());
    walk(m.mnt(), &mut dirs, &mut files)?;
    assert_eq!((dirs, files.len()), (40, 2000));
    for p in &files {
        let name = p.strip_prefix(m.mnt())?.to_str().ok_or("name")?;
        assert_eq!(std::fs::read(p)?, flat_content(name)?, "{name}");
    }
    let pushed = m.metric("casfs_pages_pushed_total")?;
    let reads = m.metric("casfs_fuse_ops_total{op=\"read\"}")?;
    eprintln!("scan of 2,000 listed files: {pushed} pushed into the page cache, {reads} reads reached the daemon");
    assert!(pushed >= 1000, "{pushed} files pushed");
    assert!(reads <= 1000, "{reads} of 2,000 files were read through the daemon");
    Ok(())
}

/// A store that answers every read of one digest with other bytes of the same length.
struct Lying {
    inner: casfs::cas::MemoryStore,
    lie: std::sync::Mutex<Option<Digest>>,
}

impl Lying {
    fn twist(&self, d: &Digest, r: casfs::error::Result<Bytes>) -> casfs::error::Result<Bytes> {
        match r {
            Ok(b) if Some(*d) == *self.lie.lock().unwrap() => {
                Ok(b.iter().map(|c| c ^ 0x20).collect::<Vec<u8>>().into())
            }
            r => r,
        }
    }
}

#[async_trait::async_trait]
impl Cas for Lying {
    async fn find_missing(&self, digests: &[Digest]) -> casfs::error::Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }
    async fn read_stream(&self, digest: &Digest, offset: u64, limit: u64) -> casfs::error::Result<ByteStream> {
        let lie = Some(*digest) == *self.lie.lock().unwrap();
        let s = self.inner.read_stream(digest, offset, limit).await?;
        Ok(if lie { s.map(|c| c.map(|b| b.iter().map(|c| c ^ 0x20).collect::<Vec<u8>>().into())).boxed() } else { s })
    }
    async fn write_stream(&self, digest: &Digest, data: ByteStream) -> casfs::error::Result<()> {
        self.inner.write_stream(digest, data).await
    }
    async fn read(&self, digest: &Digest) -> casfs::error::Result<Bytes> {
        let r = self.inner.read(digest).await;
        self.twist(digest, r)
    }
    async fn read_many(&self, digests: &[Digest]) -> casfs::error::Result<Vec<(Digest, casfs::error::Result<Bytes>)>> {
        Ok(self.inner.read_many(digests).await?.into_iter().map(|(d, r)| (d, self.twist(&d, r))).collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lying_about_a_prefetched_blob_fails_that_file_only() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let store = Arc::new(Lying { inner: casfs::cas::MemoryStore::new(), lie: Default::default() });
    let server = serve_in_process(casfs::server::Backend::new(store.clone(), Arc::new(MemoryStore::new()))).await?;
    let src = tmp.path().join("src");
    flat(20)(&src)?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    // From now on the server sends wrong bytes for one file well ahead of the reader.
    *store.lie.lock().unwrap() = Some(Digest::of_bytes(b"d12 f7\n"));
    // Files found by lookups, then files listed first (whose bytes are pushed into the
    // page cache ahead of the reader: never the refused ones).
    for listed in [false, true] {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let m = MountProcess::start(
            out.trim(),
            &tmp.path().join(format!("mnt-{listed}")),
            &server.url,
            &tmp.path().join(format!("cache-{listed}")),
            &["--metrics-listen", &metrics],
        )?;
        let mnt = m.mountpoint.clone();
        let mut failed = Vec::new();
        let reads = tokio::task::spawn_blocking(move || -> TestResult<_> {
            if listed {
                let (mut dirs, mut files) = (0, Vec::new());
                walk(&mnt, &mut dirs, &mut files)?;
                assert_eq!(files.len(), 1000);
            }
            Ok(scan(&mnt, 20))
        })
        .await??;
        for (name, r) in reads {
            match r {
                Ok(bytes) => assert_eq!(bytes, flat_content(&name)?, "{name}"),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
                    failed.push(name);
                }
            }
        }
        assert_eq!(failed, vec!["d012/f007".to_string()], "listed first: {listed}");
        let text = http_get(&metrics, "/metrics")?;
        assert!(metric(&text, "casfs_scan_prefetch_blobs_total")? >= 50, "no prefetch happened:\n{text}");
        if listed {
            assert!(metric(&text, "casfs_pages_pushed_total")? >= 50, "nothing pushed:\n{text}");
        }
        assert!(signal(m.pid, 0), "daemon died");
    }
    Ok(())
}
