//! Whole-tree reads where they pay: listing a directory fetches the Directories below it in
//! one stream (GetTree when the remote has it, level-by-level batches otherwise) within a
//! budget, and a scan of small files in directory order fetches the next directories' small
//! files ahead of the reader in large batches. Everything kept is verified: a streamed
//! Directory only when a trusted parent names the digest of its encoding, blobs through
//! [`Fetcher::prefetch_small`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use super::fetch::{Fetcher, Remote, SMALL_BLOB};
use crate::digest::Digest;
use crate::tree::Directory;

/// Most small files a scan keeps requested ahead of its reader.
const SCAN_AHEAD_FILES: usize = 32_768;

/// Where the reader of a scan is: the directory of the last file read, its parent, and how
/// many reads it saw there.
#[derive(Default)]
struct ScanPos {
    dir: u64,
    parent: u64,
    reads: u32,
    /// Sibling directories entered in a row: the window ahead doubles with each, as
    /// read-ahead does, so a short scan fetches little.
    streak: u32,
}

/// Tree and scan prefetching for one filesystem.
pub struct TreePrefetch {
    fetch: Arc<Fetcher>,
    rt: Option<tokio::runtime::Handle>,
    /// Directories whose subtree was prefetched (or is being).
    started: moka::sync::Cache<Digest, ()>,
    /// Directories whose small files a scan requested.
    scanned: moka::sync::Cache<Digest, ()>,
    pos: Mutex<ScanPos>,
    /// One scan plan at a time, so two never request the same directories.
    planning: tokio::sync::Mutex<()>,
}

/// Adds the digests of `dir`'s subdirectories to `known`; the ones not in memory go to
/// `missing`, the ones in memory are walked in turn (at most `limit` names in all).
fn expand(fetch: &Fetcher, dir: &Directory, known: &mut HashSet<Digest>, missing: &mut Vec<Digest>, limit: usize) {
    let mut stack = vec![];
    let mut visit = |d: &Directory, stack: &mut Vec<Arc<Directory>>, known: &mut HashSet<Digest>| {
        for c in &d.dirs {
            if known.len() >= limit {
                return;
            }
            if known.insert(c.digest) {
                match fetch.peek_dir(&c.digest) {
                    Some(cd) => stack.push(cd),
                    None => missing.push(c.digest),
                }
            }
        }
    };
    visit(dir, &mut stack, known);
    while let Some(d) = stack.pop() {
        visit(&d, &mut stack, known);
    }
}

/// What one tree prefetch received and kept.
#[derive(Default)]
struct Got {
    bytes: u64,
    received: usize,
    kept: u64,
    truncated: bool,
}

impl TreePrefetch {
    /// Prefetching through `fetch`, with its configuration's budgets.
    pub fn new(fetch: Arc<Fetcher>) -> Self {
        TreePrefetch {
            fetch,
            rt: tokio::runtime::Handle::try_current().ok(),
            started: moka::sync::Cache::new(1_000_000),
            scanned: moka::sync::Cache::new(1_000_000),
            pos: Mutex::new(ScanPos::default()),
            planning: tokio::sync::Mutex::new(()),
        }
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current().ok().or_else(|| self.rt.clone()) {
            Some(rt) => {
                rt.spawn(fut);
            }
            None => tracing::debug!("no runtime to prefetch on"),
        }
    }

    /// Directory `digest` (`dir`) was listed: fetch the Directories below it that are not in
    /// memory, once, in the background.
    pub fn below(self: &Arc<Self>, digest: Digest, dir: &Arc<Directory>, remote: &Arc<Remote>) {
        let cfg = self.fetch.config();
        if cfg.tree_prefetch_bytes == 0 || cfg.tree_prefetch_dirs == 0 {
            return;
        }
        if dir.dirs.iter().all(|c| self.fetch.peek_dir(&c.digest).is_some()) || self.started.contains_key(&digest) {
            return;
        }
        self.started.insert(digest, ());
        let (this, dir, remote) = (self.clone(), dir.clone(), remote.clone());
        let deadline = cfg.deadline;
        self.spawn(async move {
            let m = this.fetch.metrics().clone();
            match tokio::time::timeout(deadline, this.tree(digest, &dir, &remote)).await {
                Ok(got) => {
                    m.add("casfs_tree_prefetch_dirs_total", got.kept);
                    m.add("casfs_tree_prefetch_bytes_total", got.bytes);
                    if got.truncated {
                        m.add("casfs_tree_prefetch_truncated_total", 1);
                    }
                }
                Err(_) => tracing::debug!(root = %digest, "tree prefetch took longer than the deadline"),
            }
            m.add("casfs_tree_prefetch_done_total", 1);
        });
    }

    async fn tree(&self, root: Digest, dir: &Directory, remote: &Remote) -> Got {
        let cfg = self.fetch.config();
        let (max_bytes, max_dirs) = (cfg.tree_prefetch_bytes, cfg.tree_prefetch_dirs);
        let mut known = HashSet::new();
        let mut missing = Vec::new();
        expand(&self.fetch, dir, &mut known, &mut missing, max_dirs.saturating_mul(4));
        let mut got = Got::default();
        if missing.is_empty() {
            return got;
        }
        let m = self.fetch.metrics();
        if let Ok(Some(mut pages)) = remote.cas.tree_pages(&root).await {
            m.add("casfs_tree_prefetch_runs_total{how=\"get_tree\"}", 1);
            'pages: while let Some(page) = pages.next().await {
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(root = %root, error = %e, "GetTree failed; prefetching with batches");
                        break;
                    }
                };
                for (d, bytes, dir) in page {
                    if got.bytes + d.size() > max_bytes || got.received >= max_dirs {
                        got.truncated = true;
                        break 'pages;
                    }
                    got.bytes += d.size();
                    got.received += 1;
                    // Kept only when a trusted Directory names the digest of its encoding.
                    if known.contains(&d) {
                        for c in &dir.dirs {
                            known.insert(c.digest);
                        }
                        if self.fetch.peek_dir(&d).is_none() {
                            self.fetch.insert_prefetched_dir(d, bytes, dir);
                            got.kept += 1;
                        }
                    }
                }
            }
            if got.received > 0 {
                return got;
            }
        }
        m.add("casfs_tree_prefetch_runs_total{how=\"batches\"}", 1);
        self.walk(missing, known, max_bytes, max_dirs, remote, got).await
    }

    /// Level by level with batched reads, skipping what is in memory.
    async fn walk(
        &self,
        mut level: Vec<Digest>,
        mut known: HashSet<Digest>,
        max_bytes: u64,
        max_dirs: usize,
        remote: &Remote,
        mut got: Got,
    ) -> Got {
        while !level.is_empty() {
            let mut take = Vec::new();
            for d in level.drain(..) {
                if got.bytes + d.size() > max_bytes || got.received >= max_dirs {
                    got.truncated = true;
                    break;
                }
                got.bytes += d.size();
                got.received += 1;
                take.push(d);
            }
            let results = match remote.cas.read_many(&take).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "tree prefetch batch failed");
                    return got;
                }
            };
            let mut next = Vec::new();
            for (d, r) in results {
                // `read_many` returns verified bytes only.
                let Ok((bytes, dir)) = r.and_then(|b| Directory::decode(&d, &b).map(|dir| (b, dir))) else {
                    continue;
                };
                expand(&self.fetch, &dir, &mut known, &mut next, max_dirs.saturating_mul(4));
                if self.fetch.peek_dir(&d).is_none() {
                    self.fetch.insert_prefetched_dir(d, bytes, dir);
                    got.kept += 1;
                }
            }
            if got.truncated {
                break;
            }
            level = next;
        }
        got
    }

    /// Whether scans are looked for at all.
    pub fn scans(&self) -> bool {
        self.fetch.config().scan_ahead_bytes > 0
    }

    /// A file of directory inode `dir` is being read; `parent_of` names a directory inode's
    /// parent. True when this continues a scan: a second file of one directory, or the
    /// first of a sibling directory of the last one read.
    pub fn note_read(&self, dir: u64, parent_of: impl FnOnce(u64) -> u64) -> bool {
        let mut p = self.pos.lock().unwrap();
        if p.dir == dir {
            p.reads = p.reads.saturating_add(1);
            return p.reads == 2;
        }
        let parent = parent_of(dir);
        let sibling = p.dir != 0 && p.parent == parent && parent != dir;
        let streak = if sibling { p.streak.saturating_add(1) } else { 0 };
        *p = ScanPos { dir, parent, reads: 1, streak };
        sibling
    }

    /// A scan is in directory `current`, an entry of `parent`: fetch the small files of the
    /// directories after it, up to the scan budget ahead of the reader, in large batches.
    pub fn scan_ahead(self: &Arc<Self>, parent: Arc<Directory>, current: Digest, remote: Arc<Remote>) {
        let Some(i) = parent.dirs.iter().position(|c| c.digest == current) else { return };
        if i + 1 >= parent.dirs.len() {
            return;
        }
        let this = self.clone();
        self.spawn(async move {
            let wanted = {
                let _plan = this.planning.lock().await;
                this.plan(&parent.dirs[i + 1..], &remote).await
            };
            if !wanted.is_empty() {
                this.fetch.prefetch_small(wanted, &remote.cas).await;
            }
        });
    }

    /// The small files to request now: those of directories not yet requested within the
    /// window ahead, once they make a large batch (or reach the last directory).
    async fn plan(&self, next: &[crate::tree::DirEntry], remote: &Arc<Remote>) -> Vec<Digest> {
        let streak = self.pos.lock().unwrap().streak.min(16);
        let window = self.fetch.config().scan_ahead_bytes.min((256 << 10) << streak);
        let max_files = SCAN_AHEAD_FILES.min(1024 << streak);
        let (mut ahead_bytes, mut ahead_files) = (0u64, 0usize);
        let (mut want, mut want_bytes, mut new_dirs) = (Vec::new(), 0u64, Vec::new());
        let mut to_end = true;
        for c in next {
            if ahead_bytes >= window || ahead_files >= max_files {
                to_end = false;
                break;
            }
            let dir = match self.fetch.peek_dir(&c.digest) {
                Some(d) => d,
                None => match self.fetch.dir(c.digest, remote).await {
                    Ok(d) => d,
                    Err(_) => break,
                },
            };
            let small = dir.files.iter().map(|f| f.digest).filter(|d| d.size() <= SMALL_BLOB && !d.is_empty_blob());
            let fresh = !self.scanned.contains_key(&c.digest);
            for d in small {
                ahead_bytes += d.size();
                ahead_files += 1;
                if fresh {
                    want_bytes += d.size();
                    want.push(d);
                }
            }
            if fresh {
                new_dirs.push(c.digest);
            }
        }
        let big = want_bytes >= window / 4 || want.len() >= max_files / 4;
        if want.is_empty() || !(big || to_end) {
            return Vec::new();
        }
        for d in new_dirs {
            self.scanned.insert(d, ());
        }
        want
    }
}
