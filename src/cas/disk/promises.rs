//! A server store's promises: what `find_missing` reports present is vouched for (marked
//! used, safe from eviction for `min_lifetime`), and an upload that would need a promised
//! blob gone is refused instead.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::lru::StoreMetrics;
use super::{DiskStore, MTIME_BATCH};
use crate::digest::Digest;
use crate::error::{Error, Result};

impl DiskStore {
    /// Keeps every blob that `find_missing` reported present for at least `grace` after
    /// that (a server's promise to its clients); zero keeps plain LRU.
    pub fn with_min_lifetime(mut self, grace: Duration) -> Self {
        self.min_lifetime = grace;
        self
    }

    /// Counts evictions (`casfs_storage_evictions_total`, `..._evicted_bytes_total`) and
    /// uploads refused to keep a promise (`casfs_storage_refused_uploads_total`).
    pub fn with_metrics(mut self, m: &crate::metrics::Metrics) -> Self {
        self.metrics = Some(StoreMetrics {
            evictions: m.counter("casfs_storage_evictions_total"),
            evicted_bytes: m.counter("casfs_storage_evicted_bytes_total"),
            refused: m.counter("casfs_storage_refused_uploads_total"),
        });
        self
    }

    /// Refuses a blob that cannot fit without evicting a promised one.
    pub(super) fn check_room(&self, digest: &Digest) -> Result<()> {
        if self.max_bytes == 0 || self.min_lifetime.is_zero() {
            return Ok(());
        }
        let mut lru = self.lru.lock().unwrap();
        if lru.ticks.contains_key(digest)
            || lru.victims(self.max_bytes, digest.size(), None, self.min_lifetime).is_some()
        {
            return Ok(());
        }
        drop(lru);
        Err(self.refusal(digest))
    }

    pub(super) fn refusal(&self, digest: &Digest) -> Error {
        if let Some(m) = &self.metrics {
            m.refused.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(digest = %digest, "storage full of blobs promised to clients; upload refused");
        Error::ResourceExhausted(format!(
            "storage is full ({} bytes) of blobs that clients were told exist in the last {:?} \
             (--min-blob-lifetime); {digest} does not fit until those promises lapse",
            self.max_bytes, self.min_lifetime
        ))
    }

    /// Marks present blobs as vouched for and recently used; their mtimes follow in batches.
    pub(super) fn vouch(&self, present: &[Digest]) {
        // Without promises (a local cache, or a server told 0) presence changes nothing.
        if present.is_empty() || self.min_lifetime.is_zero() {
            return;
        }
        let now = Instant::now();
        let batch = {
            let mut lru = self.lru.lock().unwrap();
            for d in present {
                lru.touch(d);
                lru.vouched.insert(*d, now);
                lru.stale_mtimes.push(*d);
            }
            if lru.stale_mtimes.len() < MTIME_BATCH {
                return;
            }
            std::mem::take(&mut lru.stale_mtimes)
        };
        let paths: Vec<PathBuf> = batch.iter().map(|d| self.blob_path(d)).collect();
        let touch = move || {
            let now = SystemTime::now();
            for p in paths {
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(now);
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(touch)),
            Err(_) => touch(),
        }
    }
}
