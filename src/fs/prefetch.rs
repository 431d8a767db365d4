//! Bulk prefetch of an input root into the local cache, beside a running command: the paths
//! an access profile names (or, with no profile, the whole tree), Directories level by level
//! with many in flight, then small files in large batches, then large files through the
//! normal path. Everything goes through the [`Fetcher`]'s caches and is verified on the way
//! in; demand reads never wait on the prefetch (they take their own, single-flight path).
//! Bounded by a byte budget and by the profile's own size.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use super::fetch::{Fetcher, Remote, SMALL_BLOB};
use super::record::Entry;
use crate::digest::Digest;

/// Directories fetched at once.
const DIR_CONCURRENCY: usize = 64;
/// Most bytes of one small-file batch.
const BATCH_BYTES: u64 = 2 << 20;
/// Most files of one small-file batch.
const BATCH_FILES: usize = 1024;
/// Small-file batches in flight at once.
const BATCH_CONCURRENCY: usize = 8;
/// Large files fetched at once.
const LARGE_CONCURRENCY: usize = 4;

/// What to prefetch below one directory: `None` = all of it.
#[derive(Default, Debug)]
pub struct Want {
    /// Children named by the profile.
    children: HashMap<String, Want>,
    /// This entry is a file the profile names.
    file: bool,
}

impl Want {
    /// The tree of wanted paths of a profile's entries (already validated names).
    pub fn from_entries(entries: &[Entry]) -> Want {
        let mut root = Want::default();
        for e in entries {
            let mut cur = &mut root;
            for part in e.path.split('/') {
                cur = cur.children.entry(part.to_string()).or_default();
            }
            if !e.dir {
                cur.file = true;
            }
        }
        root
    }
}

/// What a prefetch did so far (read while it runs and after it is stopped).
#[derive(Default)]
pub struct Progress {
    /// Blobs brought into the local cache (Directories and files).
    pub blobs: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// File contents brought in (for the "prefetched but unused" figure).
    pub files: Mutex<Vec<Digest>>,
}

/// A prefetch of one input root.
pub struct Prefetch {
    /// Where blobs go.
    pub fetch: Arc<Fetcher>,
    /// Where they come from.
    pub remote: Arc<Remote>,
    /// Most bytes to bring in.
    pub budget: u64,
    /// What it did.
    pub progress: Arc<Progress>,
}

impl Prefetch {
    fn spend(&self, spent: &mut u64, bytes: u64) -> bool {
        if *spent + bytes > self.budget {
            return false;
        }
        *spent += bytes;
        true
    }

    /// Fetches what `want` names below `root` (`None`: everything), within the budget.
    /// Failures are logged and skipped: the command's own reads fetch (and report) anew.
    pub async fn run(self, root: Digest, want: Option<Want>) {
        let mut spent = 0u64;
        let mut small = Vec::new();
        let mut large = Vec::new();
        let mut seen_files = HashSet::new();
        let mut level: Vec<(Digest, Option<&Want>)> = vec![(root, want.as_ref())];
        let mut seen_dirs = HashSet::from([root]);
        while !level.is_empty() {
            let digests: Vec<Digest> = level.iter().map(|(d, _)| *d).collect();
            self.batch_dirs(&digests).await;
            let fetched: Vec<_> = futures::stream::iter(digests.into_iter().enumerate())
                .map(|(i, d)| {
                    let (fetch, remote) = (self.fetch.clone(), self.remote.clone());
                    async move {
                        let fresh = !fetch.cache().contains(&d);
                        (i, fetch.dir(d, &remote).await, fresh)
                    }
                })
                .buffer_unordered(DIR_CONCURRENCY)
                .collect()
                .await;
            let mut next = Vec::new();
            for (i, r, fresh) in fetched {
                let (d, w) = level[i];
                let dir = match r {
                    Ok(dir) => dir,
                    Err(e) => {
                        tracing::debug!(digest = %d, error = %e, "prefetch of a directory failed");
                        continue;
                    }
                };
                if fresh {
                    self.progress.blobs.fetch_add(1, Ordering::Relaxed);
                    self.progress.bytes.fetch_add(d.size(), Ordering::Relaxed);
                }
                for sub in &dir.dirs {
                    let child = match w {
                        None => None,
                        Some(w) => match w.children.get(sub.name.as_str()) {
                            Some(c) => Some(c),
                            None => continue,
                        },
                    };
                    if seen_dirs.insert(sub.digest) && self.spend(&mut spent, sub.digest.size()) {
                        next.push((sub.digest, child));
                    }
                }
                for f in &dir.files {
                    if w.is_some_and(|w| !w.children.get(f.name.as_str()).is_some_and(|c| c.file)) {
                        continue;
                    }
                    let d = f.digest;
                    if d.is_empty_blob() || !seen_files.insert(d) || self.fetch.cache().contains(&d) {
                        continue;
                    }
                    if d.size() > SMALL_BLOB {
                        large.push(d);
                    } else {
                        small.push(d);
                    }
                }
            }
            level = next;
        }
        // Then files (small ones many per round trip), all within the budget.
        small.retain(|d| self.spend(&mut spent, d.size()));
        large.retain(|d| self.spend(&mut spent, d.size()));
        let batches = batches(small);
        // Large files stream beside the small batches: they need bandwidth, not round trips.
        let this = Arc::new(self);
        let smalls = futures::stream::iter(batches).for_each_concurrent(BATCH_CONCURRENCY, |b| {
            let this = this.clone();
            async move { this.batch(b).await }
        });
        let larges = futures::stream::iter(large).for_each_concurrent(LARGE_CONCURRENCY, |d| {
            let this = this.clone();
            async move {
                if this.fetch.cache().contains(&d) {
                    return;
                }
                match this.fetch.load(d, &this.remote, None).await {
                    Ok(()) => this.count_file(d),
                    Err(e) => tracing::debug!(digest = %d, error = %e, "prefetch of a large file failed"),
                }
            }
        });
        futures::join!(smalls, larges);
    }

    fn count_file(&self, d: Digest) {
        self.progress.blobs.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(d.size(), Ordering::Relaxed);
        self.progress.files.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }

    /// Brings in the not yet local small Directories of one level in batches (a level of
    /// thousands costs a few round trips, not thousands); verified, decoded and registered
    /// with the fetcher, whose Directory cache then answers.
    async fn batch_dirs(&self, level: &[Digest]) {
        let missing: Vec<Digest> =
            level.iter().copied().filter(|d| d.size() <= SMALL_BLOB && !self.fetch.cache().contains(d)).collect();
        futures::stream::iter(batches(missing))
            .for_each_concurrent(BATCH_CONCURRENCY, |b| async move {
                let results = match self.remote.cas.read_many(&b).await {
                    Ok(r) => r,
                    Err(e) => return tracing::debug!(error = %e, "a directory prefetch batch failed"),
                };
                for (d, r) in results {
                    let Ok(bytes) = r else { continue };
                    // `read_many` verified the bytes, and a trusted parent named the digest
                    // (only asked-for blobs are kept); a bad Directory is left for the normal
                    // path to report.
                    if !b.contains(&d) {
                        continue;
                    }
                    let Ok(dir) = crate::tree::Directory::decode(&d, &bytes) else { continue };
                    self.fetch.insert_prefetched_dir(d, bytes, dir);
                    self.progress.blobs.fetch_add(1, Ordering::Relaxed);
                    self.progress.bytes.fetch_add(d.size(), Ordering::Relaxed);
                }
            })
            .await;
    }

    /// One batch of small files (those the command has not fetched meanwhile).
    async fn batch(&self, mut b: Vec<Digest>) {
        b.retain(|d| !self.fetch.cache().contains(d));
        if b.is_empty() {
            return;
        }
        match self.remote.cas.read_many(&b).await {
            Ok(results) => {
                let asked: HashSet<Digest> = b.iter().copied().collect();
                for (d, r) in results {
                    match r {
                        // `read_many` returns verified bytes only; a blob that was not asked
                        // for is dropped.
                        Ok(bytes) if asked.contains(&d) && bytes.len() as u64 == d.size() => {
                            self.fetch.cache().insert_verified(d, bytes);
                            self.count_file(d);
                        }
                        Ok(_) => tracing::debug!(digest = %d, "prefetch got a blob it did not ask for"),
                        Err(e) => tracing::debug!(digest = %d, error = %e, "prefetch of a file failed"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, files = b.len(), "a prefetch batch failed"),
        }
    }
}

/// Digests grouped into batches of at most [`BATCH_FILES`] blobs and [`BATCH_BYTES`] bytes.
fn batches(digests: Vec<Digest>) -> Vec<Vec<Digest>> {
    let mut out = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for d in digests {
        if !batch.is_empty() && (bytes + d.size() > BATCH_BYTES || batch.len() >= BATCH_FILES) {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += d.size();
        batch.push(d);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_follow_the_profile_paths() {
        let w = Want::from_entries(&[
            Entry { path: "a".into(), dir: true },
            Entry { path: "a/b".into(), dir: false },
            Entry { path: "c/d/e".into(), dir: false },
        ]);
        assert!(w.children["a"].children["b"].file);
        assert!(!w.children["a"].file);
        assert!(w.children["c"].children["d"].children["e"].file);
    }
}
